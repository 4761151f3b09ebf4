"""`pipeline eval` and `pipeline predict` (pipeline/inference/evaluate.py,
predict.py, commands.py): eval gives the recorded metric again, bit for bit,
or a score on another split; predict decodes raw inputs as the run's data
decodes and writes one JSON object a line; bad input is a clear error with a
documented exit code, nothing half-written."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import pipeline

from ..support import ROOT, charlm_run, cli_main, pipeline_env, run_pipeline, train_here


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short digits run (pinned mode, trained unpinned in this process)."""
    tmp = tmp_path_factory.mktemp("eval-runs")
    return train_here(tmp / "runs", ["train.epochs=2"], tmp)


def _main(argv: list[str], run: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.chdir(ROOT)
    return cli_main(argv, monkeypatch, run.parents[1])  # the cache the run was trained with


def _raw_digits(n: int) -> np.ndarray:
    """The first ``n`` rows of data/digits.csv.gz as the file holds them: 64
    integer pixels 0..16 (the label column left out)."""
    text = gzip.decompress((ROOT / "data" / "digits.csv.gz").read_bytes()).decode()
    rows = [line.split(",")[:64] for line in text.splitlines()[:n]]
    return np.array(rows, dtype=np.int64)


def test_eval_gives_the_recorded_metric_again(run: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`pipeline eval RUN` scores the run's own test split: the recorded test
    accuracy, bit for bit (printed as identical; --json gives both)."""
    assert _main(["eval", str(run), "--json"], run, monkeypatch) == 0
    got = json.loads(capsys.readouterr().out)
    recorded = json.loads((run / "run.json").read_text())["metrics"]["test_accuracy"]
    assert got["value"] == got["recorded"] == recorded and got["examples"] == 359
    assert _main(["eval", str(run)], run, monkeypatch) == 0
    assert "identical" in capsys.readouterr().out


def test_eval_on_another_split(run: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """A data override scores another split: no recorded value to compare."""
    assert _main(["eval", str(run), "data.test_fraction=0.5", "--json"], run, monkeypatch) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["recorded"] is None and got["examples"] == 898 and 0 <= got["value"] <= 1


@pytest.mark.parametrize("args,message", [
    (["train.epochs=3"], "data.* overrides only"),
    (["data.dataset=shakespeare"], "is for lm, the model for classification"),
    (["data.dataset=nothing"], "a dataset 'nothing'"),
])
def test_eval_refuses_what_the_model_cannot_take(run: Path, args: list[str], message: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Overrides of non-data keys, a dataset of another task, an unknown
    dataset: one line naming the problem, exit 2 or 3, no traceback."""
    code = _main(["eval", str(run), *args], run, monkeypatch)
    err = capsys.readouterr().err
    assert code in (2, 3) and message in err and "Traceback" not in err


@pytest.mark.parametrize("fmt", ["npy", "csv"])
def test_predict_decodes_raw_rows_as_the_data_does(run: Path, fmt: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Raw digits rows (pixels 0..16, as the data file holds them) in .npy or
    .csv: one line per row whose class is the arg max of the model's logits
    for the rows divided by 16 (the dataset's decoding)."""
    raw = _raw_digits(20)
    path = tmp_path / f"in.{fmt}"
    if fmt == "npy":
        np.save(path, raw)
    else:
        path.write_text("\n".join(",".join(map(str, r)) for r in raw) + "\n")
    assert _main(["predict", str(run), str(path)], run, monkeypatch) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(run.parents[1] / "cache"))
    logits = pipeline.load(run).predict((raw / np.float32(16)).astype(np.float32)
                                        .reshape(20, 1, 8, 8))
    assert [x["row"] for x in lines] == list(range(20))
    assert [x["class"] for x in lines] == logits.argmax(1).tolist()
    assert all(0 < x["probability"] <= 1 for x in lines)


def test_predict_writes_its_file_whole(run: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """--out writes every line to the file (atomically) and says how many."""
    np.save(tmp_path / "in.npy", _raw_digits(7).reshape(7, 1, 8, 8))
    out = tmp_path / "predictions.jsonl"
    assert _main(["predict", str(run), str(tmp_path / "in.npy"), "--out", str(out)], run,
                 monkeypatch) == 0
    assert "wrote 7 predictions" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 7


@pytest.mark.parametrize("make,code,message", [
    (lambda p: np.save(p / "in.npy", _raw_digits(3) / 16.0), 3, "raw integer values in 0..16"),
    (lambda p: np.save(p / "in.npy", np.array([{"a": 1}], dtype=object)), 3,
     "never unpickled"),
    (lambda p: np.save(p / "in.npy", _raw_digits(3)[:, :60]), 3, "rows of 64 values"),
    (lambda p: (p / "in.npy").write_text("not an array"), 3, "never unpickled"),
    (lambda p: (p / "in.npy").mkdir(), 3, "regular file"),
], ids=["already-divided", "pickled", "width", "not-an-array", "directory"])
def test_predict_refuses_bad_input(run: Path, tmp_path: Path, make, code: int, message: str,
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Already-divided values (a silent wrong answer otherwise), a pickled
    array, the wrong width, not an array, a directory: one line naming the
    file and what was expected, the documented exit code, no output file."""
    make(tmp_path)
    out = tmp_path / "out.jsonl"
    got = _main(["predict", str(run), str(tmp_path / "in.npy"), "--out", str(out)], run,
                monkeypatch)
    err = capsys.readouterr().err
    assert got == code and message in err and "in.npy" in err and not out.exists()


@pytest.mark.process
def test_predict_and_eval_a_language_model(shared_dir: Path, suite_env: dict[str, str],
                                           tmp_path: Path) -> None:
    """The charlm run (pinned, in fresh processes under its profile): eval gives
    the recorded validation loss bit for bit; predict reads text in the run's
    vocabulary and writes one next-character prediction per position; a
    character outside the vocabulary is refused naming its position."""
    run = charlm_run(shared_dir, suite_env)
    project = ["--project", "examples/charlm"]
    p = run_pipeline(["eval", str(run), *project, "--json"], suite_env)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["metric"] == "test_loss" and got["value"] == got["recorded"]
    text = (ROOT / "data" / "shakespeare.txt").read_text()[:150]
    (tmp_path / "in.txt").write_text(text)
    p = run_pipeline(["predict", str(run), str(tmp_path / "in.txt"), *project], suite_env)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert [x["position"] for x in lines] == list(range(150))
    assert "".join(x["token"] for x in lines) == text
    (tmp_path / "bad.txt").write_text(text[:100] + "\u00e9" + text[:10])
    p = run_pipeline(["predict", str(run), str(tmp_path / "bad.txt"), *project],
                     pipeline_env(tmp_path))
    assert p.returncode == 3 and "at character 100" in p.stderr


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("image-runs")
    return train_here(tmp / "runs", ["train.epochs=1", "train.max_steps=3"], tmp,
                      config="examples/images/config.toml")


def test_predict_reads_image_files_as_the_run_decoded_them(
        image_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An image folder (and one file): each image decoded as the run's images
    part decodes it, so its probabilities are the model's on the dataset's own
    row for that file; another decoder is refused (exit 3), as is a file of
    another type (exit 2) or of another size (exit 3)."""
    from pipeline.data import images

    folder = ROOT / "examples" / "images" / "digits" / "7"
    monkeypatch.chdir(ROOT / "examples" / "images")
    assert cli_main(["predict", str(image_run), str(folder)], monkeypatch, tmp_path) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    files = sorted(folder.glob("*.png"))
    assert [x["file"] for x in lines] == [str(f) for f in files]
    model = pipeline.load(image_run, ROOT / "examples" / "images")
    # the example's model.py, imported by load: forgotten, as cli_main forgets user modules
    # (a later test's project module "model" was this one, on the same worker)
    sys.modules.pop("model", None)
    spec = model.record.data["train"]
    from pipeline.data import dataset, manifest
    from pipeline.inference.predict import _probabilities
    ds = dataset.load(manifest.verify(ROOT / "examples" / "images" / "data-manifest.json"),
                      "digits_png", tmp_path / "cache")
    names = sorted(n for n in ds_members(ROOT / "examples" / "images") if "/7/" in n)
    rows = [i for i, n in enumerate(ds_members(ROOT / "examples" / "images")) if "/7/" in n]
    assert len(names) == len(files) and ds.x[rows].tolist() == images.decode_files(
        files, spec).tolist()  # each file's pixels are its dataset row's
    p = _probabilities(model.predict(ds.x[rows]))  # pinned kernels: the same batch
    assert [x["class"] for x in lines] == p.argmax(1).tolist()
    assert [x["probability"] for x in lines] == p.max(1).tolist()
    assert all(x["name"] == spec["classes"][x["class"]] for x in lines)
    assert cli_main(["predict", str(image_run), str(files[0])], monkeypatch, tmp_path) == 0
    one = _probabilities(model.predict(ds.x[rows[:1]]))
    assert json.loads(capsys.readouterr().out)["probability"] == one.max()
    monkeypatch.setattr(images, "decoder_identity", lambda: {"pillow": "0.0"})
    assert cli_main(["predict", str(image_run), str(folder)], monkeypatch, tmp_path) == 3
    assert "data.decoder" in capsys.readouterr().err  # load compares the run's decoder
    monkeypatch.undo()
    monkeypatch.chdir(ROOT / "examples" / "images")
    assert cli_main(["predict", str(image_run), str(ROOT / "README.md")], monkeypatch,
                    tmp_path) == 2
    photo = ROOT / "examples" / "images" / "photos" / "rocket" / "rocket.jpg"
    assert cli_main(["predict", str(image_run), str(photo)], monkeypatch, tmp_path) == 3
    assert "the run's input shape (1, 8, 8)" in capsys.readouterr().err


def ds_members(project: Path) -> list[str]:
    """The images dataset's member paths in the dataset's row order (path order)."""
    m = json.loads((project / "data-manifest.json").read_text())
    root = m["datasets"]["digits_png"]["train"]["root"]
    return sorted(e["path"] for e in m["files"].values() if e["path"].startswith(root + "/")
                  and e["path"].endswith(".png"))
