"""Tests for pipeline/data/arrays.py: npy and IDX headers checked (shapes of
integers NumPy can describe), npz members and gzip'd IDX read into memory
only as far as their declarations allow, each refusal naming the file, the
member, what was expected and what was found (exit 3)."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.core.errors import DataIntegrityError
from pipeline.data import formats

NPZ = {"format": "npz", "file": "d", "x": "x", "y": "y", "classes": 2}
NPY = {"format": "npy", "x": "x", "y": "y", "classes": 2}
IDX = {"format": "idx", "x": "x", "y": "y", "classes": 2, "compression": "gzip"}


def npy_bytes(shape: str, data: bytes = b"", descr: str = "|u1") -> bytes:
    """An npy file whose header says ``shape`` (a literal, written by hand: np.save
    refuses these) followed by ``data``."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    body = (header + " " * (-(len(header) + 11) % 64) + "\n").encode("latin-1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body + data


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=a.dtype.hasobject)
    return buf.getvalue()


def npz(path: Path, compress: int = zipfile.ZIP_STORED, **members: bytes) -> Path:
    with zipfile.ZipFile(path, "w", compress) as z:
        for name, blob in members.items():
            z.writestr(f"{name}.npy", blob)
    return path


def decode(spec: dict[str, Any], **paths: Path) -> formats.Decoded:
    return formats.decode(spec, paths)


Y2 = npy(np.array([0, 1]))
Y1 = npy(np.array([0]))


@pytest.mark.parametrize(("x", "found"), [
    (npy_bytes("(True, 64)", bytes(64)), "a dimension True (bool) in shape (True, 64)"),
    (npy_bytes("(1, 2.0)", bytes(2)), "shape is not valid"),
    (npy_bytes("(0, 4611686018427387904, 4)"), "larger than any array"),
    (npy_bytes("(0, 9223372036854775808)"), "larger than any array"),
    (npy_bytes("(-1, 2)"), "a negative dimension"),
    (npy_bytes("(1099511627776,)"), "found 128 bytes (truncated)"),
    (npy_bytes("(2,)", bytes(2), descr="O"), "Object arrays cannot be loaded"),
    (npy_bytes("(2, ", bytes(2)), "not a dict literal"),  # NumPy's tokenize raised: exit 70
    (npy_bytes("(0, 9223372036854775807)"), ("expected a numeric (bool/int/uint/float) array "
                                             "of >= 1 examples")),
])
def test_npz_member_shapes_are_refused_naming_the_member(tmp_path: Path, x: bytes,
                                                         found: str) -> None:
    """A bool or float dimension, one NumPy cannot describe, a negative one, a
    header larger than its member, an object dtype, zero examples: exit 3
    naming FILE[x] (NumPy crashed or raised TypeError/MemoryError on several)."""
    with pytest.raises(DataIntegrityError) as e:
        decode(NPZ, d=npz(tmp_path / "d", x=x, y=Y2))
    assert str(e.value).startswith(f"{tmp_path / 'd'}[x]: expected"), str(e.value)
    assert found in str(e.value) and e.value.exit_code == 3


@pytest.mark.parametrize("x", [npy_bytes("(True, 64)", bytes(64)),
                               npy_bytes("(0, 4611686018427387904, 4)")])
def test_npy_shapes_numpy_cannot_map_are_refused(tmp_path: Path, x: bytes) -> None:
    """The mapped path checks the same shapes (TypeError and ValueError from
    np.memmap were exit 70)."""
    for name, blob in (("x", x), ("y", Y1)):
        (tmp_path / name).write_bytes(blob)
    with pytest.raises(DataIntegrityError, match=r"/x: expected a NumPy array without"):
        decode(NPY, x=tmp_path / "x", y=tmp_path / "y")


def test_npz_control_decodes_stored_and_deflated(tmp_path: Path) -> None:
    """Control for the refusals: the hand-made header and np.save'd members,
    stored or deflated, Fortran order too, decode to their values."""
    xs = npy_bytes("(2, 2)", bytes([1, 2, 3, 4]))
    for compress in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        got = decode(NPZ, d=npz(tmp_path / "d", compress, x=xs, y=Y2))
        assert got.x.tolist() == [[1, 2], [3, 4]] and got.y.tolist() == [0, 1]
    f = np.asfortranarray(np.arange(6, dtype=">f8").reshape(2, 3))
    got = decode(NPZ, d=npz(tmp_path / "d", x=npy(f), y=Y2))
    assert got.x.tolist() == f.astype(np.float32).tolist()


def test_npz_member_size_must_be_what_its_header_declares(tmp_path: Path) -> None:
    """A member holding more or fewer bytes than its header's shape is refused,
    both counts named."""
    for data, why in ((bytes(5), "found 133 bytes (trailing bytes)"),
                      (bytes(3), "found 131 bytes (truncated)")):
        with pytest.raises(DataIntegrityError) as e:
            decode(NPZ, d=npz(tmp_path / "d", x=npy_bytes("(2, 2)", data), y=Y2))
        assert "d[x]: expected 132 bytes (header 128 + shape (2, 2) x 1 bytes)" in str(e.value)
        assert why in str(e.value)


def test_a_compressed_npz_member_is_bounded_by_its_declaration(tmp_path: Path) -> None:
    """16 MiB of zeros deflate to 16 KiB: over max_bytes, the member is refused
    from its header (declared), before its data is inflated; under it, read."""
    big = npy(np.zeros((1 << 14, 1024), np.uint8))
    d = npz(tmp_path / "d", zipfile.ZIP_DEFLATED, x=big, y=npy(np.zeros(1 << 14, np.int64)))
    assert d.stat().st_size < 1 << 20
    with pytest.raises(DataIntegrityError) as e:
        decode({**NPZ, "max_bytes": 1 << 20}, d=d)
    assert "d[x]: expected at most 1048576 bytes of content" in str(e.value)
    assert "found 16777216 bytes (header 128 + shape (16384, 1024) x 1 bytes), declared" \
        in str(e.value)
    assert len(decode({**NPZ, "max_bytes": 17 << 20}, d=d).x) == 1 << 14


def test_encrypted_member_missing_member_and_non_zip_are_data_errors(tmp_path: Path) -> None:
    """An encrypted member (zipfile raised RuntimeError: exit 70), a missing
    array, a file that is no zip archive: exit 3 naming the file."""
    d = npz(tmp_path / "d", x=npy(np.zeros((2, 2), np.uint8)), y=Y2)
    raw = bytearray(d.read_bytes())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # set bit 0: encrypted
        i = raw.find(sig)
        raw[i + flag_at] |= 1
    d.write_bytes(bytes(raw))
    with pytest.raises(DataIntegrityError, match=r"d\[x\]: expected an unencrypted member, "
                                                 r"found member 'x.npy' is encrypted"):
        decode(NPZ, d=d)
    with pytest.raises(DataIntegrityError, match=r"no array 'x'; arrays \['a', 'y'\]"):
        decode(NPZ, d=npz(tmp_path / "d", a=Y2, y=Y2))
    (tmp_path / "d").write_bytes(Y2)
    with pytest.raises(DataIntegrityError, match=r"d: expected an .npz archive .*BadZipFile"):
        decode(NPZ, d=tmp_path / "d")


def idx(shape: tuple[int, ...], data: bytes) -> bytes:
    return struct.pack(f">2xBB{len(shape)}I", 8, len(shape), *shape) + data


def test_gzip_idx_is_bounded_by_its_declared_dims(tmp_path: Path) -> None:
    """A gzip'd IDX file whose dims declare 1 GiB is refused from its header,
    however little it holds; one that declares 2x2 and inflates to 16 MiB is
    refused at the first byte past its data (it was inflated whole first)."""
    y = tmp_path / "y"
    y.write_bytes(gzip.compress(idx((2,), bytes(2))))
    x = tmp_path / "x"
    x.write_bytes(gzip.compress(idx((1 << 20, 1024), bytes(16))))
    with pytest.raises(DataIntegrityError, match=r"x: expected at most 1048576 bytes .*found "
                                                 r"1073741824 bytes \(header 12 \+ dims"):
        decode({**IDX, "max_bytes": 1 << 20}, x=x, y=y)
    x.write_bytes(gzip.compress(idx((2, 2), bytes(16 << 20))))
    with pytest.raises(DataIntegrityError, match=r"x: expected 16 bytes \(header 12 \+ dims "
                                                 r"\(2, 2\) x 1 bytes\), found more bytes"):
        decode(IDX, x=x, y=y)
    x.write_bytes(gzip.compress(idx((2, 2), bytes(3))))
    with pytest.raises(DataIntegrityError, match=r"found 15 bytes \(truncated\)"):
        decode(IDX, x=x, y=y)
    x.write_bytes(gzip.compress(idx((2, 2), bytes([1, 2, 3, 4]))))  # the control
    assert decode(IDX, x=x, y=y).x.tolist() == [[1, 2], [3, 4]]




def _unsafe_loads(source: str) -> list[str]:
    """Calls in ``source`` that may unpickle: ``np.load``/``numpy.load`` without
    ``allow_pickle=False``, ``torch.load`` without ``weights_only=True``, any
    ``pickle.load``/``pickle.loads``/``marshal.loads``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)):
            continue
        owner, name = node.func.value.id, node.func.attr
        kw = {k.arg: k.value for k in node.keywords}
        safe = {"np": ("allow_pickle", False), "numpy": ("allow_pickle", False),
                "torch": ("weights_only", True)}.get(owner)
        pickles = owner in ("pickle", "marshal", "dill") and name in ("load", "loads")
        if pickles or (safe and name == "load" and not (
                isinstance(kw.get(safe[0]), ast.Constant) and kw[safe[0]].value is safe[1])):
            found.append(f"{owner}.{name}")
    return found


def test_nothing_in_the_package_can_unpickle() -> None:
    """No module of the package calls np.load without allow_pickle=False,
    torch.load without weights_only=True, or pickle at all (npz members are
    read by pipeline.data.arrays, never np.load); the scan finds each kind in
    a planted line (its control)."""
    from ..support import ROOT

    planted = ("np.load(f)\nnp.load(f, allow_pickle=True)\nnumpy.load(f, allow_pickle=False)\n"
               "torch.load(f)\npickle.loads(b)\n")
    assert _unsafe_loads(planted) == ["np.load", "np.load", "torch.load", "pickle.loads"]
    bad = {str(p.relative_to(ROOT)): found for p in sorted((ROOT / "pipeline").rglob("*.py"))
           if (found := _unsafe_loads(p.read_text(encoding="utf-8")))}
    assert bad == {}
