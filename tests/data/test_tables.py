"""Tests for pipeline/data/tables.py (formats parquet and arrow, the parquet
extra): named columns decode to the arrays the csv format gives for the same
table, through memory-mapped files; every bad table is an error naming the
file and the column, exit 3, nothing written; without pyarrow a table's
dataset stops with exit 2 naming the extra; pyarrow's version is keyed and
recorded as images record Pillow's; the same decoded arrays train the same
weights as the csv, and a changed value does not."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

try:  # the parquet extra; CI installs it (.ci/run), and without it every test here fails
    import pyarrow as pa
    import pyarrow.feather as feather
    import pyarrow.parquet as pq
except ImportError:  # still collected where it is absent (nix's `-m determinism` check)
    pa = feather = pq = None  # type: ignore[assignment]

from pipeline.core.errors import ConfigError, DataIntegrityError, UsageError
from pipeline.data import cache as datacache
from pipeline.data import dataset, formats, manifest, tables
from pipeline.recipe import data_fields

from ..support import cli_main, pipeline_env, run_pipeline

@pytest.fixture(autouse=True)
def _pyarrow() -> None:
    if pa is None:
        pytest.fail("these tests need the parquet extra: pip install --require-hashes "
                    "-r requirements.lock -r requirements-parquet.lock")


FEATURES = ["age", "dose", "weight", "ratio"]
CSV_SPEC = {"format": "csv", "header": True, "features": [0, 4], "label": 4, "classes": 3}


def _arrays(n: int = 60, seed: int = 0) -> dict[str, np.ndarray]:
    """A small table: an int64 column, a float64 one of real values, a float32
    one, an int32 one, and an int64 label in 0..2."""
    r = np.random.default_rng(seed)
    return {"age": r.integers(18, 90, n), "dose": r.normal(0.0, 3.0, n).round(6),
            "weight": r.uniform(40, 120, n).astype(np.float32),
            "ratio": r.integers(-5, 5, n).astype(np.int32), "label": r.integers(0, 3, n)}


def _table(cols: dict[str, Any]) -> pa.Table:
    return pa.table({k: (v if isinstance(v, pa.Array) else pa.array(v)) for k, v in cols.items()})


def _csv(path: Path, cols: dict[str, np.ndarray]) -> None:
    """The same table as CSV: each number written so that it parses back to the
    same float64 (and so the same float32) as the column holds."""
    lines = [",".join(cols)]
    for i in range(len(cols["label"])):
        lines.append(",".join(repr(float(v[i])) if v.dtype.kind == "f" else str(int(v[i]))
                              for v in cols.values()))
    path.write_text("\n".join(lines) + "\n")


def _write(path: Path, cols: dict[str, Any], fmt: str = "parquet", **kw: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(_table(cols), path, **kw)
    else:
        feather.write_feather(_table(cols), str(path), compression=kw.get("compression",
                                                                        "uncompressed"))


def _entry(path: Path, root: Path) -> dict[str, Any]:
    blob = path.read_bytes()
    return {"path": path.relative_to(root).as_posix(), "sha256": hashlib.sha256(blob).hexdigest(),
            "size": len(blob), "source": "made by the test", "licence": "CC0",
            "description": "a small table"}


def _manifest(root: Path, parts: dict[str, tuple[str, dict[str, Any]]]) -> Path:
    """root/data-manifest.json with dataset ``t``: each part (train, test) a
    file under root/data and its spec (its file named by the part)."""
    raw: dict[str, Any] = {"version": 2, "files": {}, "datasets": {"t": {"task": "classification"}}}
    for part, (file, spec) in parts.items():
        raw["files"][part] = _entry(root / "data" / file, root)
        raw["datasets"]["t"][part] = {**spec, "file": part}
    (root / "data-manifest.json").write_text(json.dumps(raw, indent=1))
    return root / "data-manifest.json"


def _spec(fmt: str = "parquet", **kw: Any) -> dict[str, Any]:
    return {"format": fmt, "file": "t", "features": FEATURES, "label": "label", "classes": 3,
            **kw}


def _decode(path: Path, **kw: Any) -> formats.Decoded:
    fmt = kw.pop("fmt", "parquet")
    return formats.decode(_spec(fmt, **kw), {"t": path})


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_table_decodes_to_what_the_csv_of_it_gives(tmp_path: Path, fmt: str) -> None:
    """Named columns in the spec's order (not the file's), bit for bit the csv
    decode of the same numbers; labels int64; one chunk or several alike."""
    cols = _arrays()
    _csv(tmp_path / "t.csv", cols)
    want = formats.decode({**CSV_SPEC, "file": "t"}, {"t": tmp_path / "t.csv"})
    reordered = {k: cols[k] for k in ["label", "ratio", "dose", "age", "weight"]}
    _write(tmp_path / "t.tab", reordered, fmt)
    got = _decode(tmp_path / "t.tab", fmt=fmt)
    assert got.x.dtype == np.float32 and got.y.dtype == np.int64 and got.input_shape == (4,)
    assert np.array_equal(got.x.view(np.uint32), want.x.view(np.uint32))
    assert np.array_equal(got.y, want.y)
    if fmt == "parquet":  # several row groups: the same arrays
        _write(tmp_path / "g.tab", cols, fmt, row_group_size=7)
        assert pq.ParquetFile(tmp_path / "g.tab").num_row_groups > 1
        assert np.array_equal(_decode(tmp_path / "g.tab").x, want.x)
    shaped = _decode(tmp_path / "t.tab", fmt=fmt, shape=[2, 2], divisor=4)
    assert shaped.x.shape == (60, 2, 2)
    assert np.array_equal(shaped.x.reshape(60, 4), want.x / np.float32(4))
    assert not np.array_equal(_decode(tmp_path / "t.tab", fmt=fmt,  # control: the order
                                      features=FEATURES[::-1]).x, want.x)


def test_uncompressed_arrow_is_mapped_not_copied_and_parquet_is_mapped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both formats open the file with pa.memory_map; an uncompressed Arrow file's
    columns are the map itself (pyarrow allocates nothing to read them), a
    compressed one's are decompressed into pyarrow's memory (the control)."""
    cols = _arrays(4000)
    _write(tmp_path / "plain.arrow", cols, "arrow")
    _write(tmp_path / "lz4.arrow", cols, "arrow", compression="lz4")
    _write(tmp_path / "t.parquet", cols, "parquet", compression="none")
    mapped, real = [], pa.memory_map
    monkeypatch.setattr(pa, "memory_map", lambda p, mode="r": mapped.append(p) or real(p, mode))
    held, open_file = [], pa.ipc.open_file

    def spied(source: Any) -> Any:  # pyarrow's bytes held by the table the decode reads
        reader = open_file(source)

        class Spy:
            def __getattr__(self, name: str) -> Any:
                return getattr(reader, name)

            def read_all(self) -> pa.Table:
                before = pa.total_allocated_bytes()
                table = reader.read_all()
                held.append(pa.total_allocated_bytes() - before)
                return table
        return Spy()

    monkeypatch.setattr(pa.ipc, "open_file", spied)
    plain = _decode(tmp_path / "plain.arrow", fmt="arrow")
    # what the decode returns is its own memory, not the map (which follows the file)
    x, y = np.array(plain.x), np.array(plain.y)
    with open(tmp_path / "plain.arrow", "r+b") as f:  # in place: the same inode, mapped
        f.write(b"\0" * (tmp_path / "plain.arrow").stat().st_size)
    assert np.array_equal(plain.x, x) and np.array_equal(plain.y, y)
    _decode(tmp_path / "lz4.arrow", fmt="arrow")
    assert held[0] == 0 and held[1] >= 4000 * 8  # control: decompressed into memory
    _decode(tmp_path / "t.parquet")
    assert mapped == [str(tmp_path / n) for n in ("plain.arrow", "lz4.arrow", "t.parquet")]


def _nested(cols: dict[str, Any]) -> dict[str, Any]:
    return {**cols, "dose": pa.array([[float(v)] for v in cols["dose"]])}


def _struct(cols: dict[str, Any]) -> dict[str, Any]:
    return {**cols, "dose": pa.array([{"v": float(v)} for v in cols["dose"]])}


def _with(col: str, i: int, value: Any) -> Any:
    def edit(cols: dict[str, Any]) -> dict[str, Any]:
        values = [None if v is None else v for v in cols[col].tolist()]
        values[i] = value
        return {**cols, col: pa.array(values, type=pa.from_numpy_dtype(cols[col].dtype))}
    return edit


@pytest.mark.parametrize(("edit", "spec", "found"), [
    (_with("dose", 5, None), {}, "column 'dose'].*a null in row 5"),
    (_with("age", 7, None), {}, "column 'age'].*a null in row 7"),
    (_with("label", 3, None), {}, "column 'label'].*a null in row 3"),
    (_with("dose", 9, float("nan")), {}, "column 'dose'].*finite numbers.*nan in row 9"),
    (_with("dose", 2, float("-inf")), {}, "column 'dose'].*-inf in row 2"),
    (_with("label", 4, 3), {}, "column 'label'].*labels in 0..2.*3 in row 4 .a label outside"),
    (_with("label", 0, -1), {}, "column 'label'].*-1 in row 0"),
    (lambda c: {**c, "dose": pa.array([str(v) for v in c["dose"]])}, {},
     "column 'dose'].*a numeric column.*found a string column"),
    (lambda c: {**c, "age": pa.array(c["age"] > 50)}, {}, "column 'age'].*a bool column"),
    (lambda c: {**c, "label": pa.array(["a", "b", "c"] * 20).dictionary_encode()}, {},
     "column 'label'].*an integer column of class ids.*(dictionary|string).*map class names"),
    (_nested, {}, "column 'dose'].*a nested column .list"),
    (_struct, {}, "column 'dose'].*a nested column .struct"),
    (lambda c: {**c, "label": pa.array(["a", "b", "c"] * 20)}, {},
     "column 'label'].*an integer column of class ids.*string.*map class names"),
    (lambda c: {**c, "label": c["label"].astype(np.float64)}, {},
     "column 'label'].*an integer column.*double"),
    (lambda c: {k: v for k, v in c.items() if k != "weight"}, {},
     "column 'weight'].*one feature column named 'weight', found no such column"),
    (lambda c: c, {"label": "diagnosis"}, "column 'diagnosis'].*found no such column"),
    (lambda c: c, {"value_range": [0, 80]}, "column 'age'].*values in 0..80 .value_range"),
    (lambda c: c, {"rows": 61}, "expected 61 data rows, found 60"),
    (lambda c: c, {"max_bytes": 1000}, "fits max_bytes=1000"),
    (lambda c: {k: v[:0] for k, v in c.items()}, {}, "expected at least 1 data rows, found 0"),
    (lambda c: c, {"divisor": 1e-40}, "column 'age'].*finite float32 values after dividing"),
])
@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_bad_tables_are_refused_naming_file_and_column(tmp_path: Path, fmt: str, edit: Any,
                                                       spec: dict[str, Any], found: str) -> None:
    path = tmp_path / "t.tab"
    _write(path, edit(_arrays()), fmt)
    with pytest.raises(DataIntegrityError, match=f"^{path}.*{found}") as e:
        _decode(path, fmt=fmt, **spec)
    assert e.value.exit_code == 3


def test_duplicate_column_names_are_refused(tmp_path: Path) -> None:
    cols = _arrays()
    t = pa.Table.from_arrays([pa.array(cols[k]) for k in [*FEATURES, "label", "dose"]],
                             names=[*FEATURES, "label", "dose"])
    pq.write_table(t, tmp_path / "t.parquet")
    with pytest.raises(DataIntegrityError, match="column 'dose'].*found 2 columns of that name"):
        _decode(tmp_path / "t.parquet")


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
@pytest.mark.parametrize("spoil", ["csv", "truncate", "other-format", "empty"])
def test_a_file_of_another_type_or_truncated_is_refused(tmp_path: Path, fmt: str,
                                                         spoil: str) -> None:
    """Not a Parquet (Arrow) file, a truncated one, the other table format under
    this one's name, an empty file: exit 3 naming the file and what it should be."""
    path = tmp_path / "t.tab"
    _write(path, _arrays(), fmt)
    blob = path.read_bytes()
    if spoil == "csv":
        _csv(path, _arrays())
    elif spoil == "truncate":
        path.write_bytes(blob[:len(blob) * 2 // 3])
    elif spoil == "empty":
        path.write_bytes(b"")
    else:
        _write(path, _arrays(), "arrow" if fmt == "parquet" else "parquet")
    what = "a Parquet file" if fmt == "parquet" else r"an Arrow IPC file \(Feather v2\)"
    with pytest.raises(DataIntegrityError, match=f"^{path}: expected {what} .format {fmt}.,"):
        _decode(path, fmt=fmt)


@pytest.mark.parametrize(("edit", "key", "found"), [
    ({"features": []}, "features", "non-empty list of distinct column names"),
    ({"features": ["a", "a"]}, "features", "distinct"),
    ({"features": [0, 4]}, "features", "[0, 4] (list)"),
    ({"label": 4}, "label", "a column name"),
    ({"label": "age"}, "label", "a column that is not among the features"),
    ({"shape": [3, 2]}, "shape", "4 elements (one per feature column)"),
    ({"header": True}, "header", "unknown key"),
    ({"compression": "gzip"}, "compression", "unknown key"),
])
def test_spec_problems_name_each_key(edit: dict[str, Any], key: str, found: str) -> None:
    for fmt in ("parquet", "arrow"):
        probs = formats.spec_problems(_spec(fmt, **edit), "d", ["t"])
        assert any(k == f"d.{key}" and found in f"{e} {f}" for k, e, f in probs), probs
        with pytest.raises(ConfigError):
            formats.decode(_spec(fmt, **edit), {"t": Path("unused")})


# --- through the manifest, the cache and the CLI ------------------------------------------

@pytest.fixture
def proj(tmp_path: Path) -> Path:
    """A project whose dataset t is a table in Parquet: train 48 rows, test 12;
    beside it the same rows as CSV files (data/train.csv, data/test.csv)."""
    root = tmp_path / "proj"
    cols = _arrays()
    for part, rows in (("train", slice(0, 48)), ("test", slice(48, 60))):
        part_cols = {k: v[rows] for k, v in cols.items()}
        _write(root / "data" / f"{part}.parquet", part_cols)
        _csv(root / "data" / f"{part}.csv", part_cols)
    _manifest(root, {p: (f"{p}.parquet", _spec()) for p in ("train", "test")})
    (root / "config.toml").write_text(
        'seed = 0\n[data]\ndataset = "t"\nstandardize = true\n[model]\n'
        'factory = "pipeline.models:mlp"\n[train]\nepochs = 2\nbatch_size = 8\n'
        '[optim]\nname = "sgd"\nlr = 0.05\n')
    return root


def _train(proj: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
           capsys: pytest.CaptureFixture[str], *extra: str, runs: str = "runs"
           ) -> tuple[int, dict[str, Any] | str]:
    code = cli_main(["train", str(proj / "config.toml"), "--runs-dir", str(tmp_path / runs),
                     "--quiet", "--json", *extra], monkeypatch, tmp_path)
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err)


@pytest.mark.slow
def test_parquet_trains_the_weights_the_same_csv_trains(proj: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """The same table as Parquet and as CSV (train and test parts, standardised):
    the same data_decoded and the same weights hash (other run keys: other
    files); pyarrow's version recorded. Control: one value changed in the
    Parquet file changes data_decoded and the weights."""
    code, pq_run = _train(proj, tmp_path, monkeypatch, capsys)
    assert code == 0, pq_run
    assert isinstance(pq_run, dict)
    assert pq_run["data"]["decoder"] == {"pyarrow": pa.__version__}
    assert pq_run["data"]["decoded_sha256"] == pq_run["data_decoded"]["t"]
    _manifest(proj, {p: (f"{p}.csv", {**CSV_SPEC, "file": p}) for p in ("train", "test")})
    code, csv_run = _train(proj, tmp_path, monkeypatch, capsys, runs="runs-csv")
    assert code == 0 and isinstance(csv_run, dict), csv_run
    assert "decoder" not in csv_run["data"]
    assert csv_run["data_decoded"] == pq_run["data_decoded"]
    assert csv_run["weights_sha256"] == pq_run["weights_sha256"]
    assert csv_run["run_key"] != pq_run["run_key"]

    cols = _arrays()
    cols["dose"][3] += 1.0  # control: one value of the train part
    _write(proj / "data" / "train.parquet", {k: v[:48] for k, v in cols.items()})
    _manifest(proj, {p: (f"{p}.parquet", _spec()) for p in ("train", "test")})
    code, changed = _train(proj, tmp_path, monkeypatch, capsys, runs="runs-changed")
    assert code == 0 and isinstance(changed, dict), changed
    assert changed["data_decoded"] != pq_run["data_decoded"]
    assert changed["weights_sha256"] != pq_run["weights_sha256"]


def test_a_flipped_byte_and_a_bad_table_stop_the_run_with_nothing_written(
        proj: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A flipped byte after the manifest was written: exit 3 naming the file; a
    table the manifest promises but that does not decode (a null): exit 3
    naming the file and column. Neither writes a run directory or cache entry."""
    path = proj / "data" / "train.parquet"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    code, err = _train(proj, tmp_path, monkeypatch, capsys)
    assert code == 3 and "train.parquet: expected sha256" in str(err), err
    cols = _arrays()
    _write(path, {**{k: v[:48] for k, v in cols.items()},
                  "weight": pa.array([None] + cols["weight"][1:48].tolist(), pa.float32())})
    _manifest(proj, {p: (f"{p}.parquet", _spec()) for p in ("train", "test")})
    code, err = _train(proj, tmp_path, monkeypatch, capsys)
    assert code == 3 and "train.parquet [column 'weight']" in str(err), err
    assert "a null in row 0" in str(err) and str(err).count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "runs").exists()
    assert not list((tmp_path / "cache").glob("*.safetensors"))


def test_without_pyarrow_a_table_dataset_stops_naming_the_extra(
        proj: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """pyarrow absent (its import fails): `train` of a table dataset exits 2 with
    one line naming the parquet extra and its lock, nothing written; `data
    verify` still checks the files (it decodes nothing); another dataset of
    the same manifest still trains (nothing imports pyarrow for it)."""
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    with pytest.raises(UsageError, match="parquet extra .pyarrow."):
        tables.require("x")
    code, err = _train(proj, tmp_path, monkeypatch, capsys)
    assert code == 2, err
    assert str(err).startswith("error: ") and str(err).count("\n") == 1, err
    assert "requirements-parquet.lock" in str(err) and "Traceback" not in str(err)
    assert not (tmp_path / "runs").exists()
    assert cli_main(["data", "verify", "--project", str(proj)], monkeypatch, tmp_path) == 0
    out = capsys.readouterr().out
    assert "ok train" in out and "note: t: its decode cache not checked" in out, out
    raw = json.loads((proj / "data-manifest.json").read_text())
    raw["files"]["csv"] = _entry(proj / "data" / "train.csv", proj)
    raw["datasets"]["c"] = {"task": "classification", "train": {**CSV_SPEC, "file": "csv"}}
    (proj / "data-manifest.json").write_text(json.dumps(raw))
    code, run = _train(proj, tmp_path, monkeypatch, capsys, "data.dataset=c")
    assert code == 0, run
    assert "pyarrow" not in sys.modules or sys.modules["pyarrow"] is None


def test_pyarrow_version_is_in_the_cache_key_and_the_run_data(
        proj: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another pyarrow is another cache entry and other run data (so another
    run key), even where it decodes the same values; a csv dataset keys none."""
    v = manifest.verify(proj / "data-manifest.json")
    key, data = datacache.key(v, "t"), data_fields(v, "t", "d" * 64)
    assert data["decoder"] == {"pyarrow": pa.__version__} and data["decoded_sha256"] == "d" * 64
    monkeypatch.setattr(tables, "decoder_identity", lambda: {"pyarrow": "0.0.1"})
    assert datacache.key(v, "t") != key
    assert data_fields(v, "t", "d" * 64) != data
    ds = dataset.load(v, "t", tmp_path / "cache")  # decodes with this pyarrow: same arrays
    assert ds.n_train == 48 and len(ds.x) == 60


@pytest.mark.slow
def test_another_pyarrow_is_another_run_and_verify_reports_it(
        proj: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Another pyarrow version (simulated) decoding the same values: the same
    config is another run key (never the memoised run) with the same decoded
    arrays and weights; `verify` of the first run under it refuses the record
    (exit 5), naming the decoder's versions."""
    code, first = _train(proj, tmp_path, monkeypatch, capsys)
    assert code == 0 and isinstance(first, dict), first
    monkeypatch.setattr(tables, "decoder_identity", lambda: {"pyarrow": "0.0.1"})
    code, second = _train(proj, tmp_path, monkeypatch, capsys)
    assert code == 0 and isinstance(second, dict), second
    assert second["run_key"] != first["run_key"] and "reused" not in json.dumps(second)
    assert second["data"]["decoder"] == {"pyarrow": "0.0.1"}
    assert second["data_decoded"] == first["data_decoded"]
    assert second["weights_sha256"] == first["weights_sha256"]
    code = cli_main(["verify", str(tmp_path / "runs" / first["run_key"]), "--quiet",
                     "--project", str(proj)], monkeypatch, tmp_path)
    err = capsys.readouterr().err
    assert code == 5 and 'data.decoder.pyarrow: "' in err and '" != "0.0.1"' in err, (code, err)


@pytest.mark.process
@pytest.mark.slow
def test_a_parquet_project_gives_one_hash_at_one_and_two_processes(proj: Path,
                                                                    tmp_path: Path) -> None:
    """From the project's directory (fresh processes): standardised, with a
    validation split, one weights hash at --nproc 1 and 2, in pinned and in
    exact mode; the modes differ (control)."""
    env, found = pipeline_env(tmp_path), {}
    for mode in ("pinned", "exact"):
        for nproc in ("1", "2"):
            p = run_pipeline(["train", f"mode={mode}", "data.val_fraction=0.2", "--nproc", nproc,
                              "--runs-dir", str(tmp_path / f"runs-{mode}-{nproc}"), "--json",
                              "--quiet"], env, proj, timeout=600)
            assert p.returncode == 0, p.stderr[-2000:]
            rec = json.loads(p.stdout)
            assert "val_accuracy" in rec["metrics"] and rec["data"]["decoder"]["pyarrow"]
            found[mode, nproc] = rec["weights_sha256"]
    assert found["pinned", "1"] == found["pinned", "2"], found
    assert found["exact", "1"] == found["exact", "2"], found
    assert found["pinned", "1"] != found["exact", "1"]


def test_data_add_writes_a_parquet_part_and_refuses_a_bad_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`data add FILE --format parquet`: the part decodes before the manifest is
    written; a table with a label outside the classes is exit 3, the manifest
    untouched."""
    root = tmp_path / "p"
    _write(root / "data" / "t.parquet", _arrays())
    argv = ["data", "add", str(root / "data" / "t.parquet"), "--name", "t", "--manifest",
            str(root / "data-manifest.json"), "--format", "parquet",
            "--decode", f"features={json.dumps(FEATURES)}", "--decode", 'label="label"',
            "--licence", "CC0"]
    assert cli_main([*argv, "--decode", "classes=2"], monkeypatch, tmp_path) == 3
    assert "column 'label']" in capsys.readouterr().err
    assert not (root / "data-manifest.json").exists()
    assert cli_main([*argv, "--decode", "classes=3"], monkeypatch, tmp_path) == 0
    raw = json.loads((root / "data-manifest.json").read_text())
    assert raw["datasets"]["t"]["train"] == {**_spec(), "file": "t"}
