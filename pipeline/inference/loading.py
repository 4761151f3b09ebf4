"""``load(run_dir, project)``: a finished run's trained model, checked.

What is loaded is the trained model or nothing:
- run.json is read and checked (its digest, its key, the weights file's
  layout and hash: pipeline.record.runs.read_run);
- the model factory (and a custom loss) is imported from ``project``, the
  directory the user names (the directory of the config that trained the
  run; default: the project around the current directory), **never from a
  path the record names**: run.json's ``config_dir`` is only quoted in an
  error's hint. A project inside the run directory, or a factory module
  found there, is refused before anything is imported (a run directory is
  data someone may have handed you; a hostile run.json cannot make load run
  its code). Once the model is built and has run a forward pass, the user
  modules it ran and their sources' hash must be the ones run.json records;
- the dataset's shapes (and a text dataset's vocabulary) come from the
  project's data, verified against the hashes run.json records;
- the mode's network is built as training built it, the weights file's
  tensors are copied in by name (every name, dtype and shape must match),
  and the canonical hash of what the network then holds must be run.json's
  ``weights_sha256``.

Nothing here unpickles: weights are safetensors, records JSON. ``load`` does
not pin the process (it runs in yours): in pinned mode the logits are the
run's up to your process's kernels (``pipeline eval`` and ``predict`` run
under the run's numeric profile); in exact mode they are the same bits.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .. import modes
from ..core.config import Config, config_from_dict
from ..core.errors import CheckpointError, ConfigError, DataIntegrityError, UsageError
from ..data import manifest
from ..models import Parts, resolve
from ..project import find
from ..recipe import data_fields, manifest_path, standardize_for
from ..record import runs
from ..record.diff import differences
from ..record.schema import RunRecord

if TYPE_CHECKING:
    from ..data.dataset import Dataset
    from ..data.standardize import Standardizer
    from .model import Model

__all__ = ["load", "load_with_data", "project_base", "run_config", "dataset_for"]


def load(run_dir: str | Path, project: str | Path | None = None, *,
         device: str = "cpu") -> Model:
    """The trained model of run directory ``run_dir`` (a ``pipeline.Model``,
    an ``nn.Module``; ``.predict(x)`` gives logits), built from the factory in
    ``project`` (a project directory or its config file; default: the current
    directory) and the run's weights, checked as the module docstring says.
    Raises CheckpointError (a bad run directory, other weights or factory
    source than the record's), DataIntegrityError (other data), ConfigError
    (the factory cannot be imported from ``project``) or UsageError."""
    return load_with_data(run_dir, project, device=device)[0]


def load_with_data(run_dir: str | Path, project: str | Path | None = None, *,
                   device: str = "cpu") -> tuple[Model, Dataset, Path]:
    """``load``'s model, the run's dataset it was built for, and the project directory."""
    run_dir = Path(run_dir)
    record = runs.read_run(run_dir)
    base = project_base(project, run_dir)
    cfg = run_config(record, run_dir)
    parts = _parts(cfg, base, record, run_dir)
    ds = dataset_for(cfg, base, record, run_dir)
    model = _build(record, cfg, parts, ds, run_dir, device)
    _check_model_code(parts, record, run_dir, base)  # after building and a forward pass
    return model, ds, base


def run_config(record: RunRecord, run_dir: Path) -> Config:
    """The run's config, validated (run.json's ``config``)."""
    return config_from_dict(record.config, f"{run_dir / 'run.json'} [config]")


def project_base(project: str | Path | None, run_dir: Path) -> Path:
    """The directory user modules and the data manifest are found in: ``project``
    (a directory, or a config file's directory), else the project around the
    current directory (``pipeline.project.find``: a config.toml or
    data-manifest.json from there upwards), else the current directory.
    UsageError if it is the run directory or inside it."""
    base = Path(project) if project is not None else find(Path.cwd()) or Path.cwd()
    if base.is_file():
        base = base.parent
    if not base.is_dir():
        raise UsageError(f"--project {base}: expected a project directory (or its config "
                         f"file), found no such directory")
    base = base.resolve()
    if _inside(base, run_dir):
        raise UsageError(f"project {base}: expected a directory outside run directory "
                         f"{run_dir} (code is never imported from a run directory); name the "
                         f"project that trained it (--project DIR, or cd there)")
    return base


def _inside(path: Path, run_dir: Path) -> bool:
    run = run_dir.resolve()
    return path == run or run in path.parents


def _parts(cfg: Config, base: Path, record: RunRecord, run_dir: Path) -> Parts:
    """The factory (and loss) imported from ``base``, their sources the record's."""
    for spec in (cfg.model.factory, cfg.train.loss):
        _refuse_from_run_dir(spec, base, run_dir, record)
    try:
        parts = resolve(cfg.model.factory, cfg.train.loss, base, cfg.data.augment.transform)
    except ConfigError as e:
        hint = (f"run.json says the run's config was in {record.config_dir}: name that "
                f"project (--project DIR) if you trust its code")
        raise ConfigError(e.source, [*e.problems, hint]) from None
    return parts


def _check_model_code(parts: Parts, record: RunRecord, run_dir: Path, base: Path) -> None:
    """The user modules the factory (and loss) ran, and their sources' hash, are
    the record's (pipeline.core.usercode): else CheckpointError, not a module
    that may compute another function."""
    if parts.record() != record.model:
        raise CheckpointError(f"{run_dir / 'run.json'} [model]", "the model code it records",
                              f"{_first_difference(record.model, parts.record(), 'model')} "
                              f"in {base}", "the model code changed since the run; load it "
                              "with the code that trained it, or retrain")


def _refuse_from_run_dir(spec: str, base: Path, run_dir: Path, record: RunRecord) -> None:
    """UsageError if ``spec``'s top-level module would be imported from inside
    ``run_dir`` (found through sys.path, e.g. the current directory under
    ``python -m``). Looked up without running it: a top-level name's spec is
    found without importing anything."""
    name = spec.partition(":")[0].split(".")[0]
    if ":" not in spec or not name.isidentifier() or name in sys.modules:
        return  # a built-in loss name; or already imported (its hash is checked after)
    sys.path.insert(0, str(base))
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return  # resolve() reports it, naming the key
    finally:
        sys.path.remove(str(base))
    where = [found.origin] if found and found.origin else []
    where += list(found.submodule_search_locations or []) if found else []
    if any(_inside(Path(w).resolve(), run_dir) for w in where):
        raise UsageError(f"{spec}: module {name!r} would be imported from {where[0]}, inside "
                         f"run directory {run_dir}; code is never imported from a run "
                         f"directory (run.json says it trained in {record.config_dir}): run "
                         f"from the project that trained it")


def dataset_for(cfg: Config, base: Path, record: RunRecord | None, run_dir: Path,
                stats: Standardizer | None = None) -> Dataset:
    """``cfg``'s dataset from the project's manifest, its files verified; with
    ``record``, its decode specs, file hashes, standardisation statistics and
    decoded arrays must be the record's (DataIntegrityError naming run.json's
    field), so the shapes and vocabulary are the ones the run trained with,
    and the pretrained files the run's factory loaded are verified too and may
    be loaded again (pipeline.pretrained; ``_build`` checks it loads the same).
    ``data.standardize``: standardised by ``stats`` (another dataset scored
    by a run's model), else by its training split's (pipeline.data.standardize)."""
    from ..data import dataset
    from ..data.pretrained import set_verified

    cache = manifest.default_cache_dir()
    path = manifest_path(base)
    parsed = manifest.load_manifest(path)
    entry = parsed.datasets.get(cfg.data.dataset)
    if entry is None:
        raise DataIntegrityError(str(path), f"a dataset {cfg.data.dataset!r}",
                                 f"datasets {sorted(parsed.datasets)}",
                                 "name the project that trained the run (--project)")
    pretrained = record.data.get("pretrained", {}) if record is not None else {}
    if not isinstance(pretrained, dict):
        raise CheckpointError(f"{run_dir / 'run.json'} [data.pretrained]",
                              "an object of file names and hashes", repr(pretrained)[:80])
    verified = manifest.verify(path, names=[*entry.files(), *pretrained], stat_cache_dir=cache)
    decoded = record.data.get("decoded_sha256") if record is not None else None
    now = {**data_fields(verified, entry.name, decoded),
           **({"pretrained": {k: verified.hashes[k] for k in pretrained}} if pretrained else {})}
    if record is not None:
        recorded = {k: v for k, v in record.data.items() if k != "standardize"}
        _same(f"{run_dir / 'run.json'} [data]", recorded, now, f"the data in {path}")
        set_verified(verified)  # what the factory may load with pipeline.pretrained
    ds = dataset.load(verified, entry.name, cache)
    if record is not None:
        want = (record.data_decoded or {}).get(entry.name)
        _same(f"{run_dir / 'run.json'} [data_decoded.{entry.name}]", want,
              ds.decoded_sha256(), f"the arrays decoded from {path}")
    ds, fitted = standardize_for(cfg, ds, stats)
    if record is not None:
        _same(f"{run_dir / 'run.json'} [data.standardize]", record.data.get("standardize"),
              fitted.to_json() if fitted is not None else None,
              f"the statistics of the training split of {entry.name!r}")
    return ds


def _forward(model: Model, ds: Dataset, cfg: Config, parts: Parts) -> None:
    """Two examples through the model, as the recipe's model check runs them: the
    user modules a forward pass imports are the factory's too (usercode.track)."""
    import numpy as np
    import torch

    from ..core import usercode
    from ..train.loop import examples_of

    n = min(2, ds.counts(cfg.data.context)[0])
    x, _ = examples_of(ds, cfg.data.context, torch.device("cpu")).get(np.arange(n))
    with usercode.track(parts.factory.seen), usercode.guarded(
            f"forward on a batch of {n} inputs", "model.factory"):
        model.predict(x)


def _same(where: str, recorded: object, now: object, what: str) -> None:
    if recorded != now:
        raise DataIntegrityError(where, f"what run.json records to equal {what}",
                                 _first_difference(recorded, now, where.rpartition("[")[2][:-1]),
                                 "the run was trained on other data")


def _first_difference(recorded: object, now: object, name: str) -> str:
    """``key: recorded X, now Y`` for the first differing key."""
    diff = differences(recorded, now, name)[:1]
    if not diff:
        return f"{name}: {json.dumps(now)[:120]}"
    key, was, is_now = diff[0]
    return f"{key}: recorded {json.dumps(was)[:100]}, now {json.dumps(is_now)[:100]}"


def _build(record: RunRecord, cfg: Config, parts: Parts, ds: Dataset, run_dir: Path,
           device: str) -> Model:
    """The mode's network for ``ds``'s shapes, the run's tensors copied in, its hash checked."""
    import torch

    from ..train.checkpoint import read_safetensors
    from .model import Model, Shapes

    from ..data.pretrained import loaded

    net = modes.of(record.mode).make_net(cfg, ds, torch.device(device), parts)
    if loaded() != record.data.get("pretrained", {}):
        _same(f"{run_dir / 'run.json'} [data.pretrained]", record.data.get("pretrained", {}),
              loaded(), "the files the factory loads now")
    path = run_dir / "weights.safetensors"
    tensors, _ = read_safetensors(path)
    held = {**net.params, **net.buffers}
    if sorted(held) != sorted(tensors):
        raise CheckpointError(str(path), f"the tensors the model holds, {sorted(held)[:6]}",
                              f"{sorted(tensors)[:6]}", "another model's weights")
    with torch.no_grad():
        for name, t in held.items():
            src = tensors[name]
            if src.dtype != t.dtype or src.shape != t.shape:
                raise CheckpointError(f"{path} [{name}]", f"{t.dtype} {tuple(t.shape)}",
                                      f"{src.dtype} {tuple(src.shape)}")
            t.copy_(src)
    shape, classes = ds.shapes(cfg.data.context)
    model = Model(net, record, run_dir, Shapes(ds.task, shape, classes, ds.vocabulary,
                                                   ds.tokenizer))
    _forward(model, ds, cfg, parts)
    if (got := model.weights_sha256()) != record.weights_sha256:
        raise CheckpointError(str(path), f"weights sha256:{record.weights_sha256} (run.json)",
                              f"sha256:{got} once loaded", "the weights file changed")
    return model
