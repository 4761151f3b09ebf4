"""pipeline.load (pipeline/inference/loading.py, model.py): a finished run's
model is the trained one (its weights hash round-trips, for a pinned and an
exact run) or nothing; code is never imported from a run directory, even
when a hostile run.json names one; other weights or another factory source
are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from pipeline.core.errors import CheckpointError, ConfigError, DataIntegrityError, UsageError
from pipeline.record.schema import record_digest

from ..support import ROOT, forge_record, train_here

SHORT = ["train.epochs=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A short digits run in each mode, trained in this process once per module."""
    tmp = tmp_path_factory.mktemp("load-runs")
    return {"pinned": train_here(tmp / "runs", SHORT, tmp),
            "exact": train_here(tmp / "runs", [*SHORT, "mode=exact"], tmp)}


@pytest.fixture(autouse=True)
def _cache(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The data cache the runs were trained with; the checkout as the project."""
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(runs["pinned"].parents[1] / "cache"))
    monkeypatch.chdir(ROOT)


def _record(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


@pytest.mark.parametrize("mode", ["pinned", "exact"])
def test_load_round_trips_the_weight_hash(runs: dict[str, Path], mode: str) -> None:
    """The loaded model holds the weights file's tensors, by name, and their
    canonical hash is run.json's weights_sha256; exact mode gives its exact
    network (the spec's MLP as an ExactModule), pinned mode the stock module."""
    from safetensors.torch import load_file

    model = pipeline.load(runs[mode])
    assert isinstance(model, torch.nn.Module) and isinstance(model, pipeline.Model)
    assert model.weights_sha256() == _record(runs[mode])["weights_sha256"]
    saved = load_file(str(runs[mode] / "weights.safetensors"))
    assert sorted(model.state()) == sorted(saved)
    assert all(torch.equal(model.state()[k], saved[k]) for k in saved)
    assert type(model.module).__name__ == ("ExactModule" if mode == "exact" else "Sequence")
    assert sorted(dict(model.module.named_parameters())) == sorted(saved)


def test_predict_takes_arrays_and_gives_logits(runs: dict[str, Path]) -> None:
    """predict(x) on a NumPy batch in the model's input space gives (N, classes)
    logits, the same as calling the model on the tensor."""
    model = pipeline.load(runs["pinned"])
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    logits = model.predict(x)
    assert logits.shape == (5, 10)
    assert torch.equal(logits, model(torch.from_numpy(x)))


def _hostile(run: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of ``run`` whose run.json (digest recomputed) names a factory
    ``model:evil`` and a config_dir inside the copy, where a model.py waits
    that writes a marker file when imported. (copy, marker)."""
    import shutil

    copy = dest / "hostile-run"
    shutil.copytree(run, copy)
    marker = dest / "imported"
    (copy / "model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                   f"def evil(shape, classes):\n    raise SystemExit\n")
    raw = _record(run)
    raw["config"]["model"] = {"factory": "model:evil", "args": {}}
    raw["model"] = {"factory": "model:evil", "factory_sha256": "0" * 64}
    raw["config_dir"] = str(copy)
    (copy / "run.json").write_text(json.dumps(forge_record(raw)))  # key and digest made to fit
    return copy, marker


def test_a_hostile_record_cannot_make_load_import_its_code(
        runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run.json that names a config_dir inside the run directory (holding a
    model.py) makes load import nothing from there: from another project it is a
    config error naming the module (exit 2); a project inside the run directory,
    or the current directory there, is refused; the run directory on sys.path (as
    `python -m` puts the current directory) is refused before the import."""
    run, marker = _hostile(runs["pinned"], tmp_path)
    elsewhere = tmp_path / "project"
    elsewhere.mkdir()
    monkeypatch.delitem(sys.modules, "model", raising=False)
    # No other project's model.py on sys.path (an earlier test's import may have put
    # examples/charlm there): the only one is the hostile copy's.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p or ".") / "model.py")
                                      .exists()])
    with pytest.raises(ConfigError, match="cannot import module 'model'") as e:
        pipeline.load(run, elsewhere)
    assert e.value.exit_code == 2 and str(run) in str(e.value)  # the hint quotes config_dir
    with pytest.raises(UsageError, match="outside run directory"):
        pipeline.load(run, run)
    monkeypatch.chdir(run)
    with pytest.raises(UsageError, match="outside run directory"):
        pipeline.load(run)
    monkeypatch.chdir(elsewhere)
    monkeypatch.syspath_prepend(str(run))
    with pytest.raises(UsageError, match="never imported from a run directory"):
        pipeline.load(run, elsewhere)
    assert not marker.exists() and "model" not in sys.modules


def test_the_hostile_copy_would_run_its_code_if_imported(
        runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: the planted model.py does write its marker when imported, so the
    test above can fail."""
    run, marker = _hostile(runs["pinned"], tmp_path)
    monkeypatch.syspath_prepend(str(run))
    monkeypatch.delitem(sys.modules, "model", raising=False)
    __import__("model")
    sys.modules.pop("model", None)
    assert marker.read_text() == "ran"


def test_other_weights_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    """A weights file with the same layout but other values: CheckpointError
    (exit 5) naming the file and both hashes; nothing is returned."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "run"
    shutil.copytree(runs["pinned"], copy)
    tensors = load_file(str(copy / "weights.safetensors"))
    tensors["fc0.bias"] = tensors["fc0.bias"] + 1
    save_file(tensors, str(copy / "weights.safetensors"))
    with pytest.raises(CheckpointError, match="weights.safetensors") as e:
        pipeline.load(copy)
    assert e.value.exit_code == 5 and _record(copy)["weights_sha256"] in str(e.value)


def test_another_factory_source_is_refused(runs: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose recorded factory hash is not the source found now (a model.py
    edited since training): CheckpointError naming run.json [model] and both
    hashes, not a module that may compute another function."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(runs["pinned"], copy)
    raw = _record(copy)
    raw["model"]["factory_sha256"] = "f" * 64
    (copy / "run.json").write_text(json.dumps(forge_record(raw)))  # key and digest made to fit
    with pytest.raises(CheckpointError, match=r"run.json \[model\].*f{64}") as e:
        pipeline.load(copy)
    assert e.value.exit_code == 5


def test_a_record_whose_key_does_not_fit_its_inputs_is_refused(
        runs: dict[str, Path], tmp_path: Path) -> None:
    """An edit with only the digest recomputed (another data file's hash and
    standardisation written in): its run key no longer is the hash of the keyed
    inputs it holds, exit 5 naming run.json [run_key], before anything is
    built; control: the same edit with the key recomputed too reaches the data
    check, which refuses it as other data (exit 3)."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(runs["pinned"], copy)
    raw = _record(copy)
    raw["data"]["files"] = {k: "0" * 64 for k in raw["data"]["files"]}
    raw["record_sha256"] = record_digest(raw)
    (copy / "run.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"run.json \[run_key\]: expected the hash of "
                                              r"the keyed inputs") as e:
        pipeline.load(copy)
    assert e.value.exit_code == 5
    (copy / "run.json").write_text(json.dumps(forge_record(raw)))
    with pytest.raises(DataIntegrityError, match=r"run.json \[data\]") as e2:
        pipeline.load(copy)
    assert e2.value.exit_code == 3


def test_import_pipeline_stays_light() -> None:
    """`import pipeline` loads neither torch nor the loader; `pipeline.load` is
    there all the same (imported when first used)."""
    code = ("import sys, pipeline; print(sorted(m for m in sys.modules if m == 'torch' "
            "or m.startswith('pipeline.inference'))); print(callable(pipeline.load))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "True"]


@pytest.mark.process
def test_a_run_with_pretrained_weights_loads_in_a_fresh_process(tmp_path: Path) -> None:
    """examples/finetune (a factory that loads a pretrained backbone from its
    manifest, data.pretrained): pipeline.load from the project round-trips the
    weight hash and eval gives the recorded accuracy, in fresh processes."""
    from ..support import pipeline_env, run_pipeline

    env = pipeline_env(tmp_path)
    p = run_pipeline(["train", "examples/finetune/config.toml", "train.max_steps=5", "--runs-dir",
                      str(tmp_path / "runs"), "--json", "--quiet"], env)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(p.stdout)
    run = tmp_path / "runs" / rec["run_key"]
    assert rec["data"]["pretrained"]  # the backbone, keyed
    code = "import pipeline, sys; print(pipeline.load(sys.argv[1]).weights_sha256())"
    got = subprocess.run([sys.executable, "-c", code, str(run)], cwd=ROOT / "examples" /
                         "finetune", env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.strip() == rec["weights_sha256"]
    p = run_pipeline(["eval", str(run), "--project", "examples/finetune", "--json"], env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["value"] == rec["metrics"]["test_accuracy"]
