"""Issue 13's fuzz test (Hypothesis): configs, manifests, run records and
checkpoint metadata drawn at random, through the CLI in this process (the
no-pinning control, as tests/test_recipe.py) and the checkpoint reader.

Properties: only documented exit codes, no traceback, nothing half-written.
Bounded and reproducible: ``derandomize=True`` (examples derived from the
test itself, so CI sees the same ones), few examples, no deadline (the
machine is shared), no example database.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import cli
from pipeline.core.errors import CheckpointError, ConfigError
from pipeline.record.schema import record_digest
from pipeline.train import checkpoint

from ..support import unpin
from ..support.data import make_manifest

DOCUMENTED = {0, 1, 2, 3, 4, 5, 6, 70, 74, 130}
TINY = ["train.epochs=1", "model.args.hidden=[16]"]
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12)
KEYS = ["seed", "mode", "data.dataset", "data.test_fraction", "data.context", "model.factory",
        "model.args", "model.args.hidden", "model.args.dropout", "train.epochs",
        "train.max_steps", "train.batch_size", "train.shards", "train.loss",
        "train.checkpoint_every", "optim.name", "optim.lr", "optim.momentum", "colour",
        "train", "model.args.hidden.x"]


@pytest.fixture(autouse=True)
def unpinned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    unpin(monkeypatch, tmp_path)


def _main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code in DOCUMENTED, (code, err)
    assert "Traceback" not in err, err
    return code, err


def _no_leftovers(d: Path) -> None:
    """Nothing half-written: no temporary run directory or temp file."""
    if d.exists():
        assert not [p for p in d.rglob("*") if p.name.startswith(".tmp-")
                    or p.name.endswith(".tmp")]


def _toml_value(v: Any) -> str | None:
    """v as a TOML value, or None where TOML has none (null, nested nulls)."""
    try:
        text = tomllib.loads("v = " + json.dumps(v))  # JSON scalars/arrays are mostly TOML
        return json.dumps(v) if "v" in text else None
    except (tomllib.TOMLDecodeError, ValueError, TypeError):
        return None


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=4),
       st.binary(max_size=64))
def test_fuzzed_configs_are_config_errors_or_valid(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], values: dict[str, Any],
        junk: bytes) -> None:
    """A config file of random keys and values, or random bytes: `train`
    either trains it (one small epoch: the overrides) or refuses it with
    exit 2; nothing else, and nothing half-written."""
    lines = [f"{k} = {t}" for k, v in values.items() if (t := _toml_value(v)) is not None]
    for i, text in enumerate(["\n".join(lines).encode(), junk]):
        cfg = tmp_path / f"c{i}.toml"
        cfg.write_bytes(text)
        rd = tmp_path / "runs"
        rd.mkdir(exist_ok=True)
        code, err = _main(capsys, ["train", str(cfg), *TINY, "model.args.hidden=[4]",
                                   "train.checkpoint_every=0", "--runs-dir", str(rd),
                                   "--quiet"])
        assert code in (0, 2), err
        _no_leftovers(rd)


@FUZZ
@given(st.sampled_from(["path", "sha256", "size", "rows", "format", "extra", "version",
                        "files", "name"]), json_values)
def test_fuzzed_manifests_are_data_errors_or_valid(
        tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
        field: str, value: Any) -> None:
    """A manifest with one field replaced by a random JSON value: `data verify`
    exits 0 or 3."""
    base = make_manifest(tmp_path_factory.mktemp("m"))
    raw = json.loads(base.read_text())
    if field in ("version", "files"):
        raw[field] = value
    elif field == "name":
        raw["files"] = {str(value)[:20]: raw["files"]["digits"]}
    else:
        raw["files"]["digits"][field] = value
    base.write_text(json.dumps(raw))
    code, err = _main(capsys, ["data", "verify", "--manifest", str(base)])
    assert code in (0, 3), err


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run, trained in this process (no pinning), for the record fuzzers."""
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("trained")
    unpin(mp, tmp)
    try:
        assert cli.main(["train", *TINY, "train.checkpoint_every=5",
                         "train.checkpoint_seconds=0", "--runs-dir",
                         str(tmp / "runs"), "--quiet"]) == 0
    finally:
        mp.undo()
    (run,) = [p for p in (tmp / "runs").iterdir() if not p.name.startswith(".")]
    return run


@FUZZ
@given(st.sampled_from(["run_key", "config", "data", "data_decoded", "code_sha256",
                        "metrics", "weights_sha256", "weights_layout", "trail", "mode",
                        "toolchain", "profile", "key_inputs"]),
       json_values, st.booleans(), st.binary(max_size=32))
def test_fuzzed_run_records_are_refused_never_crash(
        tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
        trained: Path, field: str, value: Any, redigest: bool, junk: bytes) -> None:
    """run.json with one field replaced (its digest recomputed or not), or
    random bytes: `runs`, `diff`, `golden check` and `train` (reuse) give
    documented codes; train never reuses a changed record (exit 5) unless
    the change is no change."""
    tmp = tmp_path_factory.mktemp("rec")
    rd = tmp / "runs"
    run = rd / trained.name
    shutil.copytree(trained, run)
    shutil.copytree(trained.parent.parent / "cache", tmp / "cache")
    rec = json.loads((run / "run.json").read_text())
    same = rec.get(field) == value
    rec[field] = value
    if redigest:
        rec["record_sha256"] = record_digest(rec)
    (run / "run.json").write_text(json.dumps(rec))
    for text in (None, junk):
        if text is not None:
            (run / "run.json").write_bytes(text)
            same = False
        _main(capsys, ["runs", "--runs-dir", str(rd)])
        _main(capsys, ["diff", str(run), str(trained)])
        _main(capsys, ["golden", "check", str(run), "--file", str(tmp / "g.json")])
        code, err = _main(capsys, ["train", *TINY, "train.checkpoint_every=5",
                                   "train.checkpoint_seconds=0", "--runs-dir",
                                   str(rd), "--quiet"])
        assert code == (0 if same else 5), err
        _no_leftovers(rd)


@FUZZ
@given(st.sampled_from(["run_key", "config", "step", "loss_sum", "metrics", "rng",
                        "optim_scalars", "format"]), json_values)
def test_fuzzed_checkpoint_metadata_restores_or_raises_checkpoint_error(
        tmp_path_factory: pytest.TempPathFactory, trained: Path, field: str,
        value: Any) -> None:
    """A checkpoint whose metadata field is replaced by a random JSON value
    (its content hash recomputed, so it passes as intact) is refused with
    CheckpointError or restored; never another exception."""
    from pipeline.core.config import config_from_dict
    from pipeline.core.rng import DropoutStream
    from pipeline.data.dataset import load
    from pipeline.data.manifest import default_cache_dir, verify
    from pipeline.modes import of
    from pipeline.recipe import manifest_path

    rec = json.loads((trained / "run.json").read_text())
    cfg = config_from_dict(rec["config"], "run.json")
    tensors, meta = _a_checkpoint(trained, cfg, rec["run_key"])
    meta[field] = value
    ck = tmp_path_factory.mktemp("ck")
    checkpoint.save_checkpoint(checkpoint.checkpoint_path(ck, 5), tensors, meta)
    import torch

    from pipeline.models import resolve
    ds = load(verify(manifest_path()), cfg.data.dataset, default_cache_dir())
    parts = resolve(cfg.model.factory, cfg.train.loss, None)
    net = of(cfg.mode).make_net(cfg, ds, torch.device("cpu"), parts)
    opt = of(cfg.mode).make_optimizer(cfg, net, 10)
    try:
        checkpoint.restore(ck, rec["run_key"], cfg, net, opt, DropoutStream(cfg.seed),
                           checkpoint.Progress())
    except (CheckpointError, ConfigError):
        pass


def _a_checkpoint(run: Path, cfg: Any, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A real checkpoint of the trained run's config at step 5 (trained here once)."""
    ck = run.parent.parent / "ck-ref"
    if not list(ck.glob("ckpt-*")):
        from pipeline.data.dataset import load
        from pipeline.data.manifest import default_cache_dir, verify
        from pipeline.recipe import manifest_path, train_in_process
        ds = load(verify(manifest_path()), cfg.data.dataset, default_cache_dir())
        train_in_process(cfg, ds, run_key=key, ckpt_dir=ck, quiet=True)
    found = checkpoint.latest_valid(ck)
    assert found is not None
    return dict(found[1]), dict(found[2])


# --- hostile data files through `data add` (issue 27) ------------------------------------

def _npy_raw(shape: str, data: bytes = b"", descr: str = "|u1") -> bytes:
    """An npy file whose header declares ``shape`` (np.save would refuse most)."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    body = (header + " " * (-(len(header) + 11) % 64) + "\n").encode("latin-1")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body + data


def _npy(a: Any) -> bytes:
    import io

    import numpy as np
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=a.dtype.hasobject)
    return buf.getvalue()


def _zip(members: dict[str, bytes], deflate: bool = False, encrypt: bool = False) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as z:
        for name, blob in members.items():
            z.writestr(f"{name}.npy", blob)
    raw = bytearray(buf.getvalue())
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)) if encrypt else ():
        i = 0
        while (i := raw.find(sig, i)) >= 0:  # general purpose flag bit 0: "encrypted"
            raw[i + at] |= 1
            i += 4
    return bytes(raw)


def _gz(blob: bytes, copies: int = 1) -> bytes:
    import gzip
    return gzip.compress(blob, mtime=0) * copies  # members concatenated: valid gzip


def _idx(shape: tuple[int, ...], data: bytes) -> bytes:
    import struct
    return struct.pack(f">2xBB{len(shape)}I", 8, len(shape), *shape) + data


_Y2 = ("y.npy", "_y2")  # a label file added first, as a plain entry
_NPY = ["--format", "npy", "--decode", "x=x", "--decode", "y=y", "--decode", "classes=2"]
_NPZ = ["--format", "npz", "--decode", "x=x", "--decode", "y=y", "--decode", "classes=2"]
_IDX = ["--format", "idx", "--decode", "x=x", "--decode", "y=y", "--decode", "compression=gzip",
        "--decode", "classes=2"]
_CSV = ["--format", "csv", "--decode", "features=[0, 3]", "--decode", "label=3",
        "--decode", "classes=3"]
_TXT = ["--format", "text", "--decode", "vocabulary=bytes", "--decode", "compression=gzip"]


def _hostile() -> list[tuple[str, bytes, list[str], str]]:
    """(file name, its bytes, data add options, a fragment the error must hold),
    each case exit 3; the file is named "x" in the manifest."""
    import numpy as np

    y2 = _npy(np.array([0, 1]))
    zeros = _npy(np.zeros((1 << 12, 1024), np.uint8))
    return [
        ("x.npy", _npy_raw("(0, 9223372036854775807)"), _NPY, "x.npy: expected a numeric"),
        ("x.npy", _npy_raw("(True, 64)", bytes(64)), _NPY, "a dimension True (bool)"),
        ("x.npy", _npy_raw("(1099511627776,)"), _NPY, "x.npy: expected 1099511627904 bytes"),
        ("x.npy", _npy_raw("(0, 4611686018427387904, 4)"), _NPY, "larger than any array"),
        ("x.npz", _zip({"x": _npy_raw("(0, 9223372036854775807)"), "y": y2}), _NPZ,
         "x.npz[x]: expected a numeric"),
        ("x.npz", _zip({"x": _npy_raw("(True, 64)", bytes(64)), "y": y2}), _NPZ,
         "x.npz[x]: expected a NumPy array without Python objects"),
        ("x.npz", _zip({"x": _npy_raw("(1099511627776,)"), "y": y2}), _NPZ,
         "x.npz[x]: expected 1099511627904 bytes"),
        ("x.npz", _zip({"x": _npy(np.array([1, None], dtype=object)), "y": y2}), _NPZ,
         "Object arrays cannot be loaded"),
        ("x.npz", _zip({"x": _npy(np.zeros((2, 2), np.uint8)), "y": y2}, encrypt=True), _NPZ,
         "x.npz[x]: expected an unencrypted member"),
        ("x.npz", _zip({"x": zeros, "y": y2}, deflate=True),
         [*_NPZ, "--decode", "max_bytes=1048576"], "4194304 bytes (header 128 + shape"),
        ("x.npz", b"PK\x03\x04 not a zip", _NPZ, "BadZipFile"),
        ("x.gz", _gz(_idx((1 << 20, 1024), bytes(16))), _IDX,
         "x.gz: expected at most 268435456 bytes"),
        ("x.gz", _gz(_idx((2, 2), bytes(1 << 20)), 4), _IDX, "more bytes (trailing bytes)"),
        ("x.gz", _gz(_idx((2, 2), bytes(4)))[:-9], _IDX, "expected gzip data"),
        ("x.gz", b"\x1f\x8b not gzip at all", _TXT, "expected gzip data"),
        ("x.gz", _gz(bytes(1 << 20), 8), [*_TXT, "--decode", "max_bytes=1048576"],
         "x.gz: expected at most 1048576 bytes of content"),
        ("x.gz", _gz(b"1,2,3,0\n" * (1 << 17), 8),
         [*_CSV, "--decode", "compression=gzip", "--decode", "max_bytes=1048576"],
         "--decode max_bytes=N"),
        ("x.csv", b"1,2,3,0\n4,5,6,1\n", [*_CSV, "--decode", "header=true"],
         "x.csv:1: expected a header line (header = true), found a row that parses as data"),
        ("x.csv", b"a,b,c,label\n1,2,3,0\n", _CSV, "line 1 looks like a header"),
    ]


def _add(capsys: pytest.CaptureFixture[str], root: Path, name: str, blob: bytes,
         options: list[str]) -> tuple[int, str]:
    """`data add` of ``blob`` as files.x (after y.npy as files.y, for npy and idx)."""
    import numpy as np

    (root / "data").mkdir(parents=True, exist_ok=True)
    m = root / "data-manifest.json"
    if "x=x" in options and "--format" in options and options[1] in ("npy", "idx"):
        y = root / "data" / "y"
        y.write_bytes(_npy(np.array([0, 1])) if options[1] == "npy" else
                      _gz(_idx((2,), bytes(2))))
        assert _main(capsys, ["data", "add", str(y), "--name", "y", "--manifest", str(m)])[0] == 0
    (root / "data" / name).write_bytes(blob)
    return _main(capsys, ["data", "add", str(root / "data" / name), "--name", "x",
                          "--manifest", str(m), *options])


@pytest.mark.parametrize("case", range(19))
def test_hostile_data_files_are_exit_3_naming_the_file_and_write_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: int) -> None:
    """Shapes NumPy cannot hold or that lie about their size, bools as
    dimensions, pickles, encrypted or oversized npz members, gzip bombs, bad
    gzip, a CSV header that is data: exit 3 (never 70), one line naming the
    file (and member) and what was expected; the manifest keeps only y."""
    cases = _hostile()
    assert len(cases) == 19
    name, blob, options, fragment = cases[case]
    root = tmp_path / "p"
    code, err = _add(capsys, root, name, blob, options)
    assert code == 3 and fragment in err and err.count("\n") == 1, err
    m = root / "data-manifest.json"
    assert "x" not in (json.loads(m.read_text())["files"] if m.exists() else {})
    _no_leftovers(root)


_VALID: dict[str, tuple[str, list[str]]] = {
    "npy": ("x.npy", _NPY), "npz": ("x.npz", _NPZ), "idx": ("x.gz", _IDX),
    "csv": ("x.gz", [*_CSV, "--decode", "compression=gzip"]), "text": ("x.gz", _TXT)}


def _valid(fmt: str, mutate: Any) -> bytes:
    """A valid file of ``fmt`` whose content (inside its gzip or zip wrapping)
    went through ``mutate`` first."""
    import numpy as np

    x = np.arange(8, dtype=np.uint8).reshape(2, 4)
    inner = {"npy": lambda: _npy(x), "npz": lambda: _npy(x),
             "idx": lambda: _idx((2, 4), x.tobytes()), "csv": lambda: b"1,2,3,0\n4,5,6,1\n",
             "text": lambda: b"some text\n"}[fmt]()
    inner = mutate(inner)
    if fmt == "npz":
        return _zip({"x": inner, "y": _npy(np.array([0, 1]))}, deflate=True)
    return inner if fmt == "npy" else _gz(inner)


@FUZZ
@given(st.sampled_from(sorted(_VALID)), st.integers(min_value=0, max_value=2**16),
       st.lists(st.tuples(st.integers(min_value=0, max_value=2**16), st.integers(0, 255)),
                max_size=4), st.booleans(), st.booleans())
def test_fuzzed_data_files_are_data_errors_or_valid(
        tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
        fmt: str, cut: int, flips: list[tuple[int, int]], truncate: bool, inner: bool) -> None:
    """A valid npy, npz, gzip'd IDX, CSV or text file with bytes overwritten and
    perhaps cut short, in its content (``inner``: then zipped or gzipped
    again) or in the file itself: `data add` exits 0 or 3, with no traceback;
    on 3 the manifest does not hold the file, and nothing half-written is left."""
    def mutate(blob: bytes) -> bytes:
        out = bytearray(blob)
        for at, value in flips:
            out[at % len(out)] = value
        return bytes(out[:cut % len(out)] if truncate else out)

    name, options = _VALID[fmt]
    blob = _valid(fmt, mutate if inner else lambda b: b)
    root = tmp_path_factory.mktemp("d")
    code, err = _add(capsys, root, name, blob if inner else mutate(blob), options)
    assert code in (0, 3), err
    files = json.loads((root / "data-manifest.json").read_text())["files"] \
        if (root / "data-manifest.json").exists() else {}
    assert ("x" in files) == (code == 0), err
    _no_leftovers(root)
