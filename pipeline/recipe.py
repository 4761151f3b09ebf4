"""The recipe of a run: pin -> verify -> get-or-train -> record.

Every command that trains goes through here: ``pipeline train`` (one process),
the ``--nproc`` launcher and its workers (pipeline.launch), ``--rebuild`` and
``pipeline verify``. ``prepare`` makes the process fit to train (the mode's
profile, re-executing if needed), verifies every data file once and decodes
the dataset; ``get_or_train`` reuses the run's complete directory or trains
it (resuming from its checkpoints) and writes the record; ``rebuild`` and
``verify_run`` retrain in a temporary directory and compare bit for bit.

Heavy modules (numpy, torch) are imported only after ``prepare`` pinned the
process: the numeric profile must be in place before torch loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import modes
from . import project as projects
from .core import _testing, usercode
from .core.config import Config, config_from_dict
from .core.environment import device_identity, project_root
from .core.errors import (
    CheckpointError,
    ConfigError,
    DataIntegrityError,
    MismatchError,
    ProfileError,
    UsageError,
)
from .data import cache as datacache
from .data import manifest
from .record import runs
from .record.diff import input_differences
from .record.inputs import RunInputs, run_inputs
from .record.schema import RunRecord

if TYPE_CHECKING:
    from .data.dataset import Dataset
    from .data.standardize import Standardizer
    from .models import Parts
    from .train.loop import TrainResult

__all__ = ["Prepared", "Outcome", "prepare", "check_device", "check_existing", "get_or_train",
           "rebuild", "verify_run", "manifest_path", "data_fields", "standardize_for",
           "check_caches", "train_in_process"]


@dataclass(frozen=True)
class Prepared:
    """A process fit to train ``inputs``: pinned, data verified and decoded,
    the model factory (and loss) loaded."""

    inputs: RunInputs
    ds: Dataset
    parts: Parts
    base: Path | None   # where the config lives: user modules and a project manifest
    verified: manifest.Verified


@dataclass(frozen=True)
class Outcome:
    """What ``get_or_train`` gives: rank 0's record (None on other ranks), the
    weights' hash, and whether a complete run was reused."""

    record: RunRecord | None
    weights_sha256: str
    reused: bool


def manifest_path(base: Path | None = None) -> Path:
    """The data manifest of the project around ``base`` (pipeline.project:
    the nearest directory upwards holding a config.toml or data-manifest.json;
    one without a manifest of its own reads the shipped one), else the
    shipped project's."""
    if base is None:
        return project_root() / "data-manifest.json"
    return projects.resolve(start=base).manifest


def prepare(cfg: Config, argv: list[str], base: Path | None = None, *,
            trust_cache: bool = True, threads: int | None = None,
            world_size: int = 1, device: str = "cpu",
            manifest_file: Path | None = None) -> Prepared:
    """Pin (the mode's way; pinned mode may re-execute with ``argv``), load the
    model factory from ``base`` (the config's directory), verify every data
    file before anything is written, decode the config's dataset
    (``trust_cache=False``: from the files, taking no arrays from the decode
    cache), and check that the config fits it (ConfigError, exit 2, before
    any training). ``threads`` and ``world_size`` matter to the key only
    under a test-only switch whose bits depend on them (pipeline.core._testing);
    ``device`` (checked here: exit 2 if this machine lacks it) is part of the
    profile record, so pinned mode's key covers it and exact mode's does not.
    ``manifest_file``: the data manifest (default: ``manifest_path(base)``,
    the project's)."""
    mode = modes.of(cfg.mode)
    profile = mode.prepare(argv)  # may re-execute: nothing heavy before it
    check_device(device)
    profile = {**profile, "device": device_identity(device)}
    from .data import dataset  # numpy: only once pinned
    from .data.pretrained import loaded, set_verified
    from .models import resolve

    parts = resolve(cfg.model.factory, cfg.train.loss, base, cfg.data.augment.transform)
    cache = manifest.default_cache_dir()
    # Every file, hashed once; the stat cache spares a repeated run the hashing.
    verified = manifest.verify(manifest_file or manifest_path(base), stat_cache_dir=cache)
    set_verified(verified)  # the files a factory may load with pipeline.pretrained
    ds = dataset.load(verified, cfg.data.dataset, cache, trust_cache=trust_cache)
    _check_fit(cfg, ds)
    ds, stats = standardize_for(cfg, ds)
    _check_model(cfg, ds, parts)
    data = data_fields(verified, cfg.data.dataset, ds.decoded_sha256())
    if stats is not None:
        data["standardize"] = stats.to_json()
    if pretrained := loaded():  # files the model check's factory loaded (pipeline.pretrained)
        data["pretrained"] = pretrained
    switches = _testing.keyed(_testing.SWITCHES, threads=threads, world_size=world_size)
    inputs = run_inputs(cfg, mode.key_fields, data, profile, parts.record(),
                        {ds.name: ds.decoded_sha256()}, switches)
    return Prepared(inputs, ds, parts, base, verified)


def standardize_for(cfg: Config, ds: Dataset, stats: Standardizer | None = None
                    ) -> tuple[Dataset, Standardizer | None]:
    """``ds`` standardised per column (``data.standardize``) by ``stats``, or
    by the statistics of its training split under ``cfg`` (the loop's split),
    and the statistics; ``ds`` itself, None when the config does not ask."""
    if not cfg.data.standardize:
        return ds, None
    from .data import standardize
    from .data.sampling import split3

    if stats is None:  # the examples that train: neither test nor validation
        stats = standardize.fit(ds, split3(ds, cfg.seed, cfg.data.test_fraction,
                                           cfg.data.val_fraction, cfg.data.context)[0])
    return standardize.standardized(ds, stats), stats


def data_fields(verified: manifest.Verified, name: str, decoded: str | None = None
                ) -> dict[str, Any]:
    """run.json's ``data`` for dataset ``name`` of ``verified``: its task, decode
    specs and each file's sha256 (keyed: the run key covers them). A dataset of
    image files, tokenized text or tables also keys its decoder (Pillow and its
    codecs, tokenizers, pyarrow) and the decoded arrays' hash ``decoded``: another
    JPEG decoder, tokenizers or pyarrow version is another run, never the same."""
    entry = verified.datasets[name]
    out = {"dataset": entry.name, "task": entry.task.name, "train": entry.train,
           "test": entry.test, "files": {f: verified.hashes[f] for f in entry.files()}}
    if (decoder := datacache.decoder_of([entry.train, entry.test])) is not None:
        out.update(decoder=decoder, decoded_sha256=decoded)
    return out


def check_caches(verified: manifest.Verified, cache_dir: Path, *, full: bool = False) -> None:
    """``data verify``'s check of the decode cache (pipeline.data.cache.triage):
    entries that need it are compared with a fresh decode (NumPy is imported
    only then). DataIntegrityError naming the first entry that differs, or is
    corrupt (every such entry removed)."""

    fresh, problems, skipped = datacache.triage(verified, cache_dir, full=full)
    for line in skipped:
        print(f"note: {line}")
    if fresh:
        from .data.dataset import check_cache
        problems += [p for n in fresh if (p := check_cache(verified, n, cache_dir)) is not None]
    if problems:
        raise DataIntegrityError(problems[0], "a decode-cache entry equal to a fresh decode",
                                 "a differing entry (removed)", "; ".join(problems[1:]))


def _check_model(cfg: Config, ds: Dataset, parts: Parts) -> None:
    """Build the net once on the CPU and run two examples through it, so that a
    factory that fails, returns no module or the wrong logits shape is a
    ConfigError (exit 2) before anything is locked or written."""
    import numpy as np
    import torch

    from .train.loop import examples_of

    net = modes.of(cfg.mode).make_net(cfg, ds, torch.device("cpu"), parts)
    ctx = cfg.data.context
    n = min(2, ds.counts(ctx)[0])
    x, y = examples_of(ds, ctx, torch.device("cpu")).get(np.arange(n))  # the loop's own inputs
    shape, classes = ds.shapes(ctx)
    want = ds.task.logits_shape(n, ctx, classes)
    with usercode.track(parts.factory.seen), usercode.guarded(
            f"forward on a batch of {n} inputs of shape {shape}", "model.factory"):
        logits = net.predict(x)
    got = tuple(logits.shape)
    if got != want:
        raise ConfigError(f"model.factory = {parts.factory.name!r}", [
            f"model.factory: expected logits of shape {want} for {n} examples, found {got}"])
    modes.of(cfg.mode).check_loss(parts, logits, y)


def _check_fit(cfg: Config, ds: Dataset) -> None:
    """The config's data keys against the dataset: context for the task, a
    non-empty test split, at least one batch of training examples."""
    problems = []
    if (wrong := ds.task.context_problem(cfg.data.context, ds.name)) is not None:
        problems.append(wrong)
    aug = cfg.data.augment
    if (aug.resized_crop_scale or aug.crop_padding or aug.hflip) and len(ds.input_shape) != 3:
        problems.append(f"data.augment: crops and flips need (C, H, W) inputs, found "
                        f"{ds.name!r} with input shape {ds.input_shape}")
    if not problems:
        from .data.sampling import split3
        train_ids, val_ids, test_ids = split3(ds, cfg.seed, cfg.data.test_fraction,
                                              cfg.data.val_fraction, cfg.data.context)
        if len(test_ids) == 0:
            problems.append(f"data.test_fraction: {cfg.data.test_fraction} of "
                            f"{len(train_ids)} examples is an empty test split")
        if cfg.data.val_fraction > 0 and len(val_ids) == 0:
            problems.append(f"data.val_fraction: {cfg.data.val_fraction} of "
                            f"{len(train_ids)} training examples is an empty validation "
                            f"split")
        if len(train_ids) < cfg.train.batch_size:
            problems.append(f"train.batch_size: expected at most the {len(train_ids)} "
                            f"training examples of {ds.name!r}, found {cfg.train.batch_size}")
    if problems:
        raise ConfigError(f"config for dataset {ds.name!r}", problems)


def _has_device(device: str) -> bool:
    try:
        check_device(device)
    except UsageError:
        return False
    return True


def check_device(device: str) -> None:
    """UsageError unless ``device`` names a torch device this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device: expected cpu or cuda[:N], found {device!r} ({e})") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise UsageError(f"--device: expected cpu or cuda[:N], found {device!r}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0 or (dev.index or 0) >= n:
        raise UsageError(f"--device {device}: this machine has {n} CUDA device(s); use "
                         f"--device cpu (exact mode gives the same bits)")


def get_or_train(prep: Prepared, runs_dir: Path, *, comm: Any = None, device: str = "cpu",
                 quiet: bool = False, force: bool = False,
                 threads: int | None = None, loader_workers: int = 0) -> Outcome:
    """The run for ``prep.inputs``: reused if complete and re-derived
    (runs.reusable: its recorded inputs are the ones computed now, its weights
    its record's), else trained, resuming from its checkpoints, and recorded.
    What sits at runs/<key> and fails those checks is a CheckpointError (exit
    5), or with ``force`` replaced.

    With several ranks (``comm.size > 1``) the launcher holds the run lock
    (pipeline.launch), rank 0's view of runs/ decides for all, and only rank
    0 writes; another rank's Outcome has no record."""
    from .core.hashing import weights_sha256

    key = prep.inputs.key
    final = runs_dir / key
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    if size == 1 and not force and runs.is_complete(final) and not os.access(runs_dir,
                                                                              os.W_OK):
        # A read-only runs directory: reading a complete run needs no lock
        # (runs/<key> appears by one rename, complete).
        record = runs.reusable(final, prep.inputs)
        return Outcome(record, record.weights_sha256, True)
    with runs.run_lock(runs_dir, key) if size == 1 else contextlib.nullcontext():
        complete = check_existing(final, prep.inputs, force) if rank == 0 else False
        if size > 1:
            complete = comm.decide(complete)
        if rank == 0:
            runs.clean_leftovers(runs_dir, key, complete)
        if complete:
            if rank != 0:
                return Outcome(None, "", True)
            record = runs.reusable(final, prep.inputs)
            return Outcome(record, record.weights_sha256, True)
        started = time.time()
        ckpt_dir = runs_dir / f".ckpt-{key}"
        result = _train(prep, ckpt_dir=ckpt_dir, comm=comm, device=device, quiet=quiet,
                        threads=threads, loader_workers=loader_workers)
        if rank != 0:
            return Outcome(None, weights_sha256(result.params), False)
        record = runs.write_run(final, prep.inputs, result, started, device=device,
                                world_size=size, config_dir=prep.base)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        return Outcome(record, record.weights_sha256, False)


def _train(prep: Prepared, **kw: Any) -> TrainResult:
    from .train.loop import train

    cfg = prep.inputs.config
    return train(cfg, prep.ds, modes.of(cfg.mode), prep.parts, run_key=prep.inputs.key, **kw)


def train_in_process(cfg: Config, ds: Dataset, *, run_key: str = "in-process",
                     ckpt_dir: Path | None = None, **kw: Any) -> TrainResult:
    """The training loop for ``cfg`` on ``ds`` in this process, with the config's
    mode and model (loaded from sys.path), no run record: for benches and tests."""
    from .models import resolve
    from .train.loop import train

    parts = resolve(cfg.model.factory, cfg.train.loss, None, cfg.data.augment.transform)
    return train(cfg, ds, modes.of(cfg.mode), parts, run_key=run_key, ckpt_dir=ckpt_dir, **kw)


def check_existing(final: Path, inputs: RunInputs, force: bool) -> bool:
    """Whether runs/<key> holds this run, re-derived; what fails the checks
    raises, or with ``force`` is removed (under the run lock)."""
    try:
        if runs.is_complete(final):
            runs.reusable(final, inputs)
            return True
        runs.check_slot(final)
        return False
    except CheckpointError as e:
        if not force:
            raise
        print(f"replacing (--force): {e}", file=sys.stderr)
        runs.remove_slot(final)
        return False


def _retrain(prep: Prepared, *, device: str, quiet: bool, what: str) -> RunRecord:
    """Train ``prep`` from scratch in a temporary runs directory."""
    with tempfile.TemporaryDirectory(prefix=f"pipeline-{what}-") as tmp:
        again = get_or_train(prep, Path(tmp), device=device, quiet=quiet).record
    assert again is not None  # one process: rank 0
    return again


def rebuild(prep: Prepared, record: RunRecord, *, device: str = "cpu",
            quiet: bool = False) -> None:
    """Retrain and compare with ``record`` bit for bit (MismatchError if not);
    the arrays ``prep`` decoded must be the ones the record was trained on."""
    _check_decoded(prep, record)
    again = _retrain(prep, device=device, quiet=quiet, what="rebuild")
    if again.weights_sha256 != record.weights_sha256:
        raise MismatchError(f"rebuild differs: recorded sha256:{record.weights_sha256}, "
                            f"rebuilt sha256:{again.weights_sha256}")


def verify_run(run_dir: Path, argv: list[str], *, project: Path | None = None,
               quiet: bool = False) -> tuple[RunRecord, list[str]]:
    """Retrain the run in ``run_dir`` from its recorded config and compare its
    weights bit for bit. Returns (its record, the inputs that differ here).
    The model's code and the data manifest come from ``project`` (else the
    project around the working directory: ``pipeline.project``), never from a
    path the record names: a record is data, and importing what it points to
    would run whatever code sits there."""
    record = runs.read_run(run_dir)
    cfg = config_from_dict(record.config, f"{run_dir}/run.json")
    base = _verify_base(record, cfg, run_dir, project)
    device = record.device or "cpu"
    if not _has_device(device):
        raise ProfileError(f"{run_dir}/run.json [device]: the run was trained on {device!r}, "
                           f"which this machine lacks; verify it where that device is")
    prep = prepare(cfg, argv, base, trust_cache=False, device=device)  # trusts no cache
    _check_decoded(prep, record)
    differences = []
    if prep.inputs.key != record.run_key:
        from .record.diff import differences as field_differences
        from .record.diff import input_fields
        now = prep.inputs.fields()
        differences = input_differences(input_fields(record), now)
        # The environment may differ (another toolchain, profile or pipeline code:
        # that is what verify is for); the run may not: a record claiming other
        # data, model code or config than the project gives is not this run's.
        run = [d for name in ("config", "data", "model")
               for d in field_differences(record.field(name), now[name], name)]
        if run:
            where, was, found = run[0]
            raise CheckpointError(f"{run_dir}/run.json", "the data, model code and config "
                                  "the project gives now",
                                  f"{where}: {json.dumps(was)[:140]} != "
                                  f"{json.dumps(found)[:140]}",
                                  "verify retrains what the project holds, and that is not "
                                  "what this record says it was trained from")
    again = _retrain(prep, device=device, quiet=quiet, what="verify")
    if again.weights_sha256 != record.weights_sha256:
        why = "".join(f"\n  {line}" for line in differences)
        raise MismatchError(f"verify failed: recorded sha256:{record.weights_sha256}, "
                            f"retrained sha256:{again.weights_sha256}"
                            + (f"; inputs that differ here:{why}" if why else ""))
    if again.metrics != record.metrics:  # outputs of the same weights: re-derived too
        raise MismatchError(f"verify failed: {run_dir}/run.json [metrics] records "
                            f"{record.metrics}, the retrained run gives {again.metrics}")
    return record, differences


def _verify_base(record: RunRecord, cfg: Config, run_dir: Path,
                 project: Path | None) -> Path:
    """Where ``verify`` imports the model's code from: the project the user
    names (``--project``: a directory or its config file, as every command
    takes it), else the project around the working directory, else the
    working directory (a lone config's, as train and eval take it); never
    the record's ``config_dir`` and never inside the run directory."""
    from .core.config import LOSSES
    from .models import BUILTINS

    found = projects.find(Path.cwd()) if project is None else None
    base = projects.resolve(project).root if project is not None else found or Path.cwd().resolve()
    user = [spec for spec in (cfg.model.factory, cfg.train.loss)
            if spec not in BUILTINS and spec not in LOSSES]
    module = user[0].partition(":")[0].split(".")[0] if user else ""
    if (user and project is None and found is None
            and not ((base / f"{module}.py").exists() or (base / module).is_dir())):
        raise UsageError(f"{run_dir}/run.json: model.factory {cfg.model.factory!r} is the "
                         f"user's code, and no project was given or found here; pass --project "
                         f"DIR (run.json says it was trained from {record.config_dir})")
    if base.is_relative_to(Path(run_dir).resolve()):
        raise UsageError(f"--project {base}: a run directory holds data, not code; name the "
                         f"project the run was trained from (run.json says "
                         f"{record.config_dir})")
    return base


def _check_decoded(prep: Prepared, record: RunRecord) -> None:
    """The record's decoded-array hash equals this decode's (prepared from the
    file, not the cache, by verify and --rebuild), else DataIntegrityError:
    the run was trained on other arrays (a forged or corrupt decode cache)."""
    name = prep.ds.name
    want = (record.data_decoded or {}).get(name)
    found = prep.inputs.decoded[name]
    if want != found:
        then, now = record.data.get("decoder"), prep.inputs.data.get("decoder")
        kinds = {"pillow": "image", "tokenizers": "tokenizer", "pyarrow": "table"}
        which = "".join(f"{k} " for lib, k in kinds.items() if lib in {**(then or {}),
                                                                          **(now or {})})
        why = (f"the {which}decoder differs: {then} then, {now} here" if then != now
               else "a forged or corrupt decode cache?")
        raise DataIntegrityError(f"run.json [data_decoded.{name}]",
                                 f"the hash of {name} decoded from its file, {found}",
                                 str(want), f"the run was trained on other arrays ({why}); "
                                 "retrain it with --force")
