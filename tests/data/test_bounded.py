"""Tests for pipeline/data/bounded.py: content read into memory within a
bound (``max_bytes``), counted after decompression, refused at the bound and
never inflated past it; the memory of a decode is about its output (peak RSS
from the kernel's VmHWM, reset before the decode: Linux)."""

from __future__ import annotations

import gzip
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.errors import DataIntegrityError
from pipeline.data import bounded, formats

TEXT = {"format": "text", "file": "t", "vocabulary": "bytes", "compression": "gzip"}


def bomb(path: Path, mib: int) -> Path:
    """A gzip file of ``mib`` MiB of zeros that is about ``mib`` KiB on disk: one
    1 MiB member, repeated (a file of several members is valid gzip)."""
    member = gzip.compress(bytes(1 << 20), mtime=0)
    path.write_bytes(member * mib)
    return path


@pytest.fixture
def inflated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes every gzip read returned (what zlib inflated into memory)."""
    sizes: list[int] = []

    class Counting(gzip.GzipFile):
        def read(self, size: int | None = -1) -> bytes:
            got = super().read(size)
            sizes.append(len(got))
            return got

    monkeypatch.setattr(bounded.gzip, "GzipFile", Counting)
    return sizes


def test_a_gzip_bomb_is_refused_at_the_bound_never_inflated_past_it(
        tmp_path: Path, inflated: list[int]) -> None:
    """8 MiB inflated under max_bytes 1 MiB: refused naming the file, the bound
    and how to raise it, after inflating at most the bound plus one byte."""
    path = bomb(tmp_path / "t", 8)
    with pytest.raises(DataIntegrityError) as e:
        formats.decode({**TEXT, "max_bytes": 1 << 20}, {"t": path})
    msg = str(e.value)
    assert msg.startswith(f"{path}: expected at most 1048576 bytes of content"), msg
    assert "--decode max_bytes=N" in msg and e.value.exit_code == 3
    assert 0 < sum(inflated) <= (1 << 20) + 1


def test_content_within_the_bound_decodes(tmp_path: Path, inflated: list[int]) -> None:
    """Control: the same bomb with max_bytes at its size decodes, every byte
    (inflated twice: once to measure it, keeping nothing, once to decode it)."""
    path = bomb(tmp_path / "t", 2)
    got = formats.decode({**TEXT, "max_bytes": 2 << 20}, {"t": path})
    assert len(got.x) == 2 << 20 and not got.x.any() and sum(inflated) == 2 * (2 << 20)


def test_the_default_bound_applies_without_max_bytes(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No max_bytes in the spec: DEFAULT_MAX_BYTES (256 MiB) bounds it (lowered
    here to 1 MiB so the test stays small); a plain file is refused from its
    size, before it is read."""
    monkeypatch.setattr(bounded, "DEFAULT_MAX_BYTES", 1 << 20)
    with pytest.raises(DataIntegrityError, match="at most 1048576 bytes"):
        formats.decode(TEXT, {"t": bomb(tmp_path / "t", 2)})
    plain = tmp_path / "p"
    plain.write_bytes(b"a" * ((1 << 20) + 1))
    with pytest.raises(DataIntegrityError, match=r"found a file of 1048577 bytes"):
        formats.decode({**TEXT, "compression": "none"}, {"t": plain})
    plain.write_bytes(b"a" * (1 << 20))
    assert len(formats.decode({**TEXT, "compression": "none"}, {"t": plain}).x) == 1 << 20


def test_max_bytes_is_a_decode_key_of_the_in_memory_formats() -> None:
    """csv, npz, idx and text take max_bytes (an integer >= 1); npy (mapped) does not."""
    base = {"csv": {"file": "f", "features": [0, 1], "label": 1, "classes": 2},
            "npz": {"file": "f", "x": "a", "y": "b", "classes": 2},
            "idx": {"x": "f", "y": "f", "classes": 2},
            "text": {"file": "f", "vocabulary": "chars"}}
    for fmt, spec in base.items():
        assert formats.spec_problems({"format": fmt, **spec, "max_bytes": 10}, "", ["f"]) == []
        bad = formats.spec_problems({"format": fmt, **spec, "max_bytes": 0}, "", ["f"])
        assert [p[0] for p in bad] == ["max_bytes"], bad
    npy = {"format": "npy", "x": "f", "y": "f", "classes": 2, "max_bytes": 10}
    assert [p[0] for p in formats.spec_problems(npy, "", ["f"])] == ["max_bytes"]


# --- memory: peak RSS of a decode, in a fresh process ------------------------------

_PEAK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from pipeline.data import formats
    spec, path, how = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def status(key):  # KiB, from the kernel's own accounting
        line = [s for s in open("/proc/self/status") if s.startswith(key + ":")][0]
        return int(line.split()[1])

    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from now
    base = status("VmRSS")
    if how == "inflate-all":  # the control: what a decode without a bound holds
        import gzip; blob = gzip.decompress(path.read_bytes()); out = "read"
    else:
        try:
            got = formats.decode(spec, {spec["file"]: path}); out = len(got.x)
        except Exception as e:
            out = type(e).__name__
    print(json.dumps({"grew_mib": (status("VmHWM") - base) / 1024, "out": out,
                      "base_mib": base / 1024}))
""")


def _peak(spec: dict[str, Any], path: Path, how: str = "decode") -> dict[str, Any]:
    import json

    p = subprocess.run([sys.executable, "-c", _PEAK, json.dumps(spec), str(path), how],
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


@pytest.mark.process
def test_a_refused_bomb_costs_no_memory(tmp_path: Path) -> None:
    """256 MiB inflated, max_bytes 128 MiB: the decode's peak RSS grows by less
    than 16 MiB (measured 2.6; a decode keeping its pieces, 4 bytes per
    character, held 605 MiB when it reached the bound: now the size is measured
    first, keeping nothing);
    the control (the same file inflated whole) grows by 256 MiB, so the
    measurement sees what inflating costs."""
    path = bomb(tmp_path / "t", 256)
    for vocabulary in ("chars", "bytes"):
        spec = {**TEXT, "vocabulary": vocabulary, "max_bytes": 128 << 20}
        got = _peak(spec, path)
        assert got["out"] == "DataIntegrityError" and got["grew_mib"] < 16, got
    control = _peak(TEXT, path, "inflate-all")
    assert control["grew_mib"] > 200, control


@pytest.mark.process
def test_text_decoding_needs_about_its_output(tmp_path: Path) -> None:
    """64 MiB of text (chars): the tokens are 512 MiB of int64, and the decode's
    peak RSS grows by at most 1.5x that (measured 1.16x; it was 2.75x, 22x the
    text); and by at least 0.9x (the control: the measurement sees them)."""
    path = tmp_path / "t.txt"
    line = b"the quick brown fox jumps over the lazy dog 0123456789\n"
    path.write_bytes(line * ((64 << 20) // len(line)))
    got = _peak({"format": "text", "file": "t", "vocabulary": "chars"}, path)
    tokens_mib = got["out"] * 8 / (1 << 20)
    assert tokens_mib > 500 and 0.9 * tokens_mib <= got["grew_mib"] <= 1.5 * tokens_mib, got


def test_zlib_max_length_is_what_bounds_gzip_reads() -> None:
    """The property gzip's reader relies on (zlib's max_length): one call inflates
    at most the bytes asked for, whatever the input holds."""
    d = zlib.decompressobj(31)
    assert len(d.decompress(gzip.compress(bytes(1 << 20)), 1000)) == 1000


def test_a_decode_without_memory_is_a_data_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """NumPy failing to allocate (max_bytes raised past the machine) is exit 3
    naming the file and max_bytes, not an internal error (exit 70)."""
    from pipeline.data import text

    def no_memory(*_: object) -> None:
        raise MemoryError("Unable to allocate 8.00 GiB")

    monkeypatch.setattr(text, "_fill", no_memory)
    with pytest.raises(DataIntegrityError) as e:
        formats.decode(TEXT, {"t": bomb(tmp_path / "t", 1)})
    assert str(e.value).startswith(f"{tmp_path / 't'}: expected data whose decode fits in "
                                   f"memory (max_bytes {bounded.DEFAULT_MAX_BYTES} of content)")
    assert "Unable to allocate 8.00 GiB" in str(e.value) and e.value.exit_code == 3
