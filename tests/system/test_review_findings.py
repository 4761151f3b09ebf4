"""The hostile review of the third phase's surfaces (issue 27's "done when"):
each case it found, reproduced as a test of the fix, with the control that
shows the test can fail. The review's ids (D1...) are in the test names'
docstrings; docs/explanation/threat-model.md lists them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import ConfigError, DataIntegrityError
from pipeline.data.standardize import Standardizer
from pipeline.record.diff import differences

from ..support import ROOT, cli_main

TABULAR = ROOT / "examples" / "tabular"

LAZY_MODEL = '''
from torch import nn


class Net(nn.Module):
    def __init__(self, shape, k):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(shape[0] * shape[1] * shape[2], k))

    def forward(self, x):
        if x.shape[0] > 2:  # a path the two-example check forward never takes
            import lazyhelper
            x = x * lazyhelper.SCALE
        return self.body(x)


def net(input_shape, num_classes):
    return Net(input_shape, num_classes)
'''


def _project(tmp: Path, model: str) -> Path:
    root = tmp / "proj"
    root.mkdir()
    (root / "model.py").write_text(model)
    (root / "lazyhelper.py").write_text("SCALE = 1.0\n")
    (root / "config.toml").write_text('[model]\nfactory = "model:net"\n[train]\nmax_steps = 3\n')
    return root


def test_d1_a_module_imported_only_while_training_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """D1: a user module the forward imports on a path the check forward did
    not take is not in the run key; training refuses it at the step that
    imported it (exit 2, naming module and file), nothing written. Control:
    the same helper imported at the top of model.py trains."""
    root = _project(tmp_path, LAZY_MODEL)
    monkeypatch.chdir(root)
    assert cli_main(["train", "--quiet"], monkeypatch, tmp_path) == 2
    err = capsys.readouterr().err
    assert "a training step at step 1 imported lazyhelper" in err
    assert str(root / "lazyhelper.py") in err
    assert not list((root / "runs").glob("*/run.json"))  # no run, not even a partial one
    (root / "model.py").write_text("import lazyhelper\n" + LAZY_MODEL)
    assert cli_main(["train", "--quiet"], monkeypatch, tmp_path) == 0
    rec = json.loads(next((root / "runs").glob("*/run.json")).read_text())
    assert "lazyhelper" in rec["model"]["modules"]


def test_d2_a_standardised_value_beyond_float32_is_refused() -> None:
    """D2: (x - mean) / std that overflows float32 is a DataIntegrityError
    naming the row and column (training and predict), never inf trained on
    or NaN printed. Control: the value within range passes."""
    st = Standardizer(np.array([0.0, 1.0]), np.array([1e-6, 1.0]), 10)
    ok = st.apply(np.array([[1e30, 2.0]], np.float32), "rows.csv")
    assert np.isfinite(ok).all()
    with pytest.raises(DataIntegrityError, match=r"rows.csv: expected values whose "
                                                 r"standardised form.*row 0, column 0"):
        st.apply(np.array([[1e37, 2.0]], np.float32), "rows.csv")


def test_d11_another_column_count_is_a_config_error() -> None:
    """D11: rows of another width than the statistics: exit 2, not 70."""
    st = Standardizer(np.zeros(3), np.ones(3), 10)
    with pytest.raises(ConfigError, match="expected rows of 3 values.*found 2"):
        st.apply(np.zeros((4, 2), np.float32), "dataset 'bc29'")


@pytest.fixture(scope="module")
def tab_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/tabular trained 2 epochs, in a copy of the project."""
    tmp = tmp_path_factory.mktemp("tab")
    proj = tmp / "tabular"
    shutil.copytree(TABULAR, proj, ignore=shutil.ignore_patterns("runs"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(proj)
        assert cli_main(["train", "train.epochs=2", "--quiet"], mp, tmp) == 0
    return next((proj / "runs").iterdir())


def test_d3_predict_reads_integer_features_as_training_did(tmp_path: Path) -> None:
    """D3: predict parses an integer-feature CSV as int64, then float32, as
    the decode does (a float64 first would round 2^58 + 2^35 to 2^58), and
    refuses fields training refuses (padded with spaces, a byte-order mark)."""
    from pipeline.inference.predict import _csv

    spec = {"format": "csv", "value_range": [0, 1 << 60], "features": [0, 1], "label": 1}
    big = 2 ** 58 + 2 ** 34 + 1  # just above a float32 tie once rounded to float64
    raw = _csv(f"{big}\n{2 ** 58}\n".encode(), tmp_path / "r.csv", spec)
    assert raw.dtype == np.int64
    assert raw.astype(np.float32)[:, 0].tolist() == [2.0 ** 58 + 2 ** 35, 2.0 ** 58]
    assert np.float32(np.float64(big)) == np.float32(2.0 ** 58)  # control: the old path
    for bad, why in ((b" 17.99 \n", "each field"), (b"\xef\xbb\xbf1,2\n", "byte-order mark"),
                     (b"1,2\n3\n", "2 fields")):
        with pytest.raises(DataIntegrityError, match=why):
            _csv(bad, tmp_path / "r.csv", {"format": "csv", "features": [0, 2], "label": 2})


def test_d8_d10_card_and_predict_refuse_bad_project_and_out_paths(
        tab_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """D8: card --project that does not exist: exit 2 (as eval's). D10: --out
    inside the run directory, or a directory: exit 2, the run untouched.
    Control: --out elsewhere writes the file."""
    before = (tab_run / "run.json").read_bytes()
    monkeypatch.chdir(tab_run.parents[1])
    assert cli_main(["card", str(tab_run), "--project", "/nonexistent/typo"],
                    monkeypatch, tmp_path) == 2
    rows = tmp_path / "rows.csv"
    rows.write_text(",".join(["1.5"] * 30) + "\n")
    for out in (tab_run / "run.json", tab_run / "weights.safetensors", tmp_path):
        assert cli_main(["predict", str(tab_run), str(rows), "--out", str(out)],
                        monkeypatch, tmp_path) == 2
        assert cli_main(["card", str(tab_run), "--out", str(out)], monkeypatch, tmp_path) == 2
    assert (tab_run / "run.json").read_bytes() == before
    assert "expected a file outside the run directory" in capsys.readouterr().err
    assert cli_main(["card", str(tab_run), "--out", str(tmp_path / "card.md")],
                    monkeypatch, tmp_path) == 0
    text = (tmp_path / "card.md").read_text()
    assert text.startswith("#") and "## Inputs" in text  # D4: the card says what the model takes
    assert "standardised column by column" in text and "data.standardize" in text


def test_eval_of_the_runs_own_split_scoring_otherwise_exits_1(
        tab_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """D1's second half: eval's own split scored otherwise than recorded is a
    mismatch, exit 1 (it printed "differs" and exited 0). Control: as recorded, 0."""
    from pipeline.train import loop

    monkeypatch.chdir(tab_run.parents[1])
    assert cli_main(["eval", str(tab_run)], monkeypatch, tmp_path) == 0
    real = loop.score
    monkeypatch.setattr(loop, "score", lambda *a, **k: (lambda m, v, n: (m, v - 0.01, n))(
        *real(*a, **k)))
    assert cli_main(["eval", str(tab_run)], monkeypatch, tmp_path) == 1
    assert "differs" in capsys.readouterr().out


def test_d6_a_missing_config_in_a_project_is_not_the_shipped_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """D6: `train configs/digits.toml` inside a user's project (which has no
    such file) is exit 2 naming it, not the shipped config trained into the
    installed tree; outside any project it is the shipped one, runs in ./runs."""
    root = _project(tmp_path, "import lazyhelper\n" + LAZY_MODEL)
    monkeypatch.chdir(root)
    args = ["train", "configs/digits.toml", "train.max_steps=1", "--quiet"]
    assert cli_main(args, monkeypatch, tmp_path) == 2
    assert "configs/digits.toml" in capsys.readouterr().err
    assert not (root / "runs").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert cli_main(args, monkeypatch, tmp_path) == 0
    assert (empty / "runs").is_dir() and "none found from" in capsys.readouterr().err


def test_d13_a_list_difference_names_its_index() -> None:
    """D13: differing lists of one length are compared element by element."""
    a, b = {"std": [1.0, 2.0, 3.0]}, {"std": [1.0, 2.0, 3.5]}
    assert differences(a, b, "data.standardize") == [("data.standardize.std[2]", 3.0, 3.5)]


# --- round 2: images, augmentation, launchers, preemption ---------------------------

@pytest.mark.process
def test_r2_world_size_1_under_an_outside_launcher_trains(tmp_path: Path) -> None:
    """Round 2, 1 (a hang): RANK=0 WORLD_SIZE=1 (a PyTorchJob or srun of one
    task) waited forever on its own run lock; it trains, as one process does."""
    from ..support import pipeline_env, run_pipeline

    env = pipeline_env(tmp_path, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT="29581")
    p = run_pipeline(["train", "configs/digits.toml", "train.max_steps=2", "--runs-dir",
                      str(tmp_path / "runs"), "--quiet"], env, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines()[-1].startswith("weights sha256:")


def test_r2_verify_refuses_a_record_forged_with_its_key(
        tab_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Round 2, 3: a record whose data (here the standardisation) was edited and
    its run key and digest recomputed names other inputs than the project
    gives: verify refuses it (exit 5) instead of retraining the project's and
    saying "verified"; control: the untouched run verifies."""
    from ..support import forge_record

    monkeypatch.chdir(tab_run.parents[1])
    assert cli_main(["verify", str(tab_run), "--quiet"], monkeypatch, tmp_path) == 0
    forged = tmp_path / "forged" / "run"
    shutil.copytree(tab_run, forged)
    raw = json.loads((forged / "run.json").read_text())
    raw["data"]["standardize"]["std"][2] *= 100
    (forged / "run.json").write_text(json.dumps(forge_record(raw)))
    capsys.readouterr()
    assert cli_main(["verify", str(forged), "--quiet"], monkeypatch, tmp_path) == 5
    assert "data.standardize.std[2]" in capsys.readouterr().err


def test_r2_crops_on_flat_inputs_are_refused_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Round 2, 5: crops or flips on a table (input shape (30,)): exit 2 before
    training (it was exit 70 at step 1)."""
    monkeypatch.chdir(TABULAR)
    assert cli_main(["train", "data.augment.hflip=true", "--runs-dir",
                     str(tmp_path / "runs"), "--quiet"], monkeypatch, tmp_path) == 2
    assert "crops and flips need (C, H, W) inputs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
