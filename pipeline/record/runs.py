"""Run directories: read and write them, decide whether one may be reused,
lock and list them.

runs/<run_key>/ is built in a temporary sibling and renamed into place, so a
directory with that name is always complete. A directory is reused only when
its record (pipeline.record.schema.RunRecord) holds every keyed input equal to
the one computed now (pipeline.record.inputs) and its weights hash holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core import atomic, locks
from ..core.config import canonical_json, config_sha256
from ..core.errors import CheckpointError, UsageError
from .diff import differences
from .inputs import INPUT_FIELDS, RunInputs
from .plots import plot_curves
from .schema import RunRecord, Trail, load_record

__all__ = ["is_complete", "check_slot", "read_run", "reusable", "write_run", "run_lock",
           "remove_slot", "list_runs", "clean_leftovers"]

_KEY = re.compile(r"[0-9a-f]{64}")


def is_complete(run_dir: Path) -> bool:
    """A real directory (not a link) holding run.json and the weights."""
    return (not run_dir.is_symlink() and run_dir.is_dir() and (run_dir / "run.json").is_file()
            and (run_dir / "weights.safetensors").is_file())


def check_slot(final: Path) -> None:
    """Refuse what sits at runs/<key> unless it is nothing or a complete run
    directory: a file, a symbolic link, or a directory missing its files was
    not made by write_run (which renames a complete directory into place)."""
    if not (final.is_symlink() or final.exists()) or is_complete(final):
        return
    what = ("a symbolic link" if final.is_symlink() else "a directory without run.json and "
            "weights.safetensors" if final.is_dir() else "not a directory")
    raise CheckpointError(str(final), "a complete run directory (or nothing)", what,
                          "remove it, or rerun with --force to replace it")


def read_run(run_dir: Path, *, check_key: bool = True) -> RunRecord:
    """run.json of a run directory, checked against itself (record_sha256 and,
    with ``check_key``, its run key against the keyed inputs it records), its
    directory name (the run key) and its weights file."""
    from ..core.hashing import weights_sha256
    from ..train.checkpoint import read_safetensors

    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    record = load_record(path)
    if check_key:
        _check_key(record, path)
    if _KEY.fullmatch(run_dir.name) and record.run_key != run_dir.name:
        raise CheckpointError(f"{path} [run_key]", f"the directory's key {run_dir.name}",
                              record.run_key, "a run copied under another key")
    weights = run_dir / "weights.safetensors"
    tensors, _ = read_safetensors(weights)
    layout = _layout(tensors)
    if layout != record.weights_layout:
        raise CheckpointError(str(weights), f"the tensors run.json lists "
                              f"{record.weights_layout}", f"{layout}",
                              "the weights file was replaced or tampered with")
    actual = weights_sha256(tensors)
    if actual != record.weights_sha256:
        raise CheckpointError(str(weights), f"weights sha256:{record.weights_sha256} "
                              f"(run.json)", f"sha256:{actual}",
                              "the weights file was replaced or tampered with")
    return record


def _check_key(record: RunRecord, path: Path) -> None:
    """The record's run key is the hash of the keyed inputs it records
    (``key_inputs``), as RunInputs.key computes it: a record edited with its
    digest recomputed (another dataset, config or model written in) is not
    a record of that run. CheckpointError otherwise."""
    unknown = [n for n in record.key_inputs if n not in INPUT_FIELDS]
    if unknown:
        raise CheckpointError(f"{path} [key_inputs]", f"input names among "
                              f"{sorted(INPUT_FIELDS)}", f"{unknown}")
    keyed = {name: record.field(INPUT_FIELDS[name]) for name in record.key_inputs}
    key = hashlib.sha256(canonical_json(keyed)).hexdigest()
    if key != record.run_key:
        raise CheckpointError(f"{path} [run_key]", f"the hash of the keyed inputs the record "
                              f"holds ({', '.join(record.key_inputs)}), {key}",
                              record.run_key, "the record was edited after the run; "
                              "retrain it (train --force) or restore its run.json")


def reusable(run_dir: Path, inputs: RunInputs) -> RunRecord:
    """The record of complete run ``run_dir`` if it is the run of ``inputs``:
    read_run's checks, then the key, the list of keyed inputs, every keyed
    input and the decoded data's hash equal to those computed now (not
    trusted from its key). Else CheckpointError naming run.json and the field
    (the fields first, so that an edited record names what differs)."""
    record = read_run(run_dir, check_key=False)
    now = inputs.fields()
    keyed = [INPUT_FIELDS[name] for name in sorted(inputs.keyed())]
    for name in ["run_key", "key_inputs", *keyed, "data_decoded"]:
        mine = list(record.key_inputs) if name == "key_inputs" else record.field(name)
        if name == "data_decoded" and not now[name]:
            continue  # nothing decoded to compare with (a dataset of no arrays)
        if mine != now[name]:
            diff = differences(mine, now[name], name)[:1]
            found = f"{diff[0][0]} = {json.dumps(diff[0][1])[:120]}" if diff else "?"
            raise CheckpointError(f"{run_dir / 'run.json'} [{name}]",
                                  f"the {name} computed now", found,
                                  "not this run's record; rerun with --force to replace it")
    _check_key(record, run_dir / "run.json")
    return record


def _layout(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Name -> dtype and shape: what run.json promises about weights.safetensors."""
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
            for k, v in tensors.items()}


def write_run(final: Path, inputs: RunInputs, result: Any, started: float, *,
              device: str, world_size: int, config_dir: Path | None) -> RunRecord:
    """Write every file into a temporary sibling, then rename it to ``final``.
    ``result`` is the loop's TrainResult (pipeline.train.loop)."""
    from safetensors.torch import save

    from ..core.hashing import FINGERPRINT_KIND, weights_sha256

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name[:16]}-"))
    try:
        weights = save(result.params)
        atomic.write_bytes(tmp / "weights.safetensors", weights)
        atomic.write_bytes(tmp / "trail.bin", result.trail)
        metrics = "".join(json.dumps(m, sort_keys=True, allow_nan=False) + "\n"
                          for m in result.metrics).encode()
        atomic.write_bytes(tmp / "metrics.jsonl", metrics)
        plot_curves(tmp / "curves.png", result.metrics)
        last = result.metrics[-1] if result.metrics else {}
        f = inputs.fields()
        record = RunRecord(
            run_key=f["run_key"], weights_sha256=weights_sha256(result.params),
            weights_layout=_layout(result.params), mode=inputs.config.mode,
            config=f["config"], data=f["data"], toolchain=f["toolchain"],
            profile=f["profile"], key_inputs=tuple(f["key_inputs"]),
            metrics={**{k: v for k, v in last.items() if k.startswith(("test_", "val_"))},
                     "train_loss": last.get("train_loss"), "steps": result.steps},
            trail=Trail(tuple(result.trail_names), 8, FINGERPRINT_KIND, "trail.bin"),
            config_sha256=config_sha256(inputs.config), code_sha256=f["code_sha256"],
            model=f["model"], data_decoded=f["data_decoded"],
            test_switches=f.get("test_switches", {}),
            files={"weights.safetensors": hashlib.sha256(weights).hexdigest(),
                   "metrics.jsonl": hashlib.sha256(metrics).hexdigest()},
            resumed_from_step=result.resumed_from, device=device, world_size=world_size,
            config_dir=str(config_dir) if config_dir is not None else None,
            threads=_threads(result.threads), parameters=result.structure,
            **_when(started, result.loop_s))  # kept out of the key: when and how long
        atomic.write_text(tmp / "run.json",
                          json.dumps(record.to_json(), indent=2, sort_keys=True,
                                     allow_nan=False) + "\n")
        os.chmod(tmp, 0o755)
        remove_slot(final)  # checked (or --force) before training
        atomic.check_owner()
        os.rename(tmp, final)
        atomic.fsync_dir(final.parent)
        return record
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _when(started: float, loop_s: float) -> dict[str, Any]:
    """run.json's created_utc, duration_s (training and record) and loop_s (the training
    loop alone: TrainResult.loop_s). With SOURCE_DATE_EPOCH set (the
    reproducible-builds convention, https://reproducible-builds.org/specs/source-date-epoch/;
    nixpkgs' stdenv sets it in every derivation) created_utc is that time and the durations
    are left out, so that two builds of one run write the same bytes (`nix build --rebuild`)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return {"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "duration_s": round(time.time() - started, 3), "loop_s": round(loop_s, 3)}
    if not epoch.isdigit():
        raise UsageError(f"SOURCE_DATE_EPOCH: expected a non-negative integer (seconds since "
                         f"1970), found {epoch!r}")
    return {"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))}


def _threads(threads: dict[str, Any] | None) -> dict[str, Any] | None:
    """run.json's ``threads``. With SOURCE_DATE_EPOCH set (see ``_when``) what a busier
    machine can change is left out, like the durations, so that two builds of one run
    write the same bytes: ``--threads auto`` chooses the shard pool by timing the first
    step (pipeline.train.threads), so its outcome, ``shard_threads``, goes, and so does
    ``fallback`` (a pool's shards that went back to running in order: only a pool chosen
    by that timing can have one); exact mode's ``exact_kernels`` (whether the native
    kernels compiled, within a time limit, or the torch implementation ran: the same
    bits) goes whatever was asked."""
    if threads is None or "SOURCE_DATE_EPOCH" not in os.environ:
        return threads
    timed = ("shard_threads", "fallback") if threads.get("requested") == "auto" else ()
    return {k: v for k, v in threads.items() if k not in (*timed, "exact_kernels")}


def run_lock(runs_dir: Path, key: str) -> contextlib.AbstractContextManager[None]:
    """Hold the file lock of run ``key``: concurrent trainers of one key
    serialise on it; the OS drops the lock of a killed holder, so a stale
    lock never blocks, and the holder removes the file (pipeline.core.locks)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    return locks.exclusive(runs_dir / f".{key}.lock",
                           f"waiting: another process is training run {key[:16]}")


def remove_slot(final: Path) -> None:
    """Remove whatever is at ``final`` (a directory, a file or a link)."""
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        shutil.rmtree(final)


def list_runs(runs_dir: Path) -> Iterator[tuple[str, RunRecord | None, str]]:
    """(name, record, "") for each run directory that passes read_run's
    checks, (name, None, why) for each that does not; hidden entries skipped."""
    for d in sorted(runs_dir.iterdir()):
        if d.name.startswith("."):
            continue
        try:
            if not is_complete(d):
                check_slot(d)
            yield d.name, read_run(d), ""
        except CheckpointError as e:
            yield d.name, None, str(e)


def clean_leftovers(runs_dir: Path, key: str, complete: bool) -> None:
    """Remove what a writer killed by SIGKILL left: half-built run directories
    of this key, and its checkpoints once the run is complete. Only called
    under the run's lock, so no live writer owns them."""
    for tmp in runs_dir.glob(f".tmp-{key[:16]}-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if complete:
        shutil.rmtree(runs_dir / f".ckpt-{key}", ignore_errors=True)
