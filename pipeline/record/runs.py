"""Run records: the run key, the run directory (read, write), the run lock,
and the differences between two records.

runs/<run_key>/ is built in a temporary sibling and renamed into place, so a
directory with that name is always complete. The key is the sha256 of the
canonical JSON of the run's inputs: config, data hashes, code hash, and (in
pinned mode) the toolchain fingerprint and numeric profile: the mode decides
(pipeline.modes, ``key_fields``). Exact mode's bits depend on neither, so its
key leaves them out (they are still recorded).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import modes
from ..core import atomic, locks
from ..core.config import Config, canonical_json, config_sha256, config_to_dict
from ..core.errors import CheckpointError, UsageError
from .plots import plot_curves
from .schema import load_record, record_digest
from .trail import FINGERPRINT_KIND, read_trail

__all__ = ["RunInputs", "run_inputs", "is_complete", "check_slot", "read_run", "reusable",
           "record_digest", "write_run", "run_lock", "remove_slot", "list_runs", "read_trail",
           "clean_leftovers", "diff_runs", "first_divergence", "input_differences"]

_KEY = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RunInputs:
    """Everything that decides the weights, and the key derived from it."""
    config: Config
    data: dict[str, Any]
    code: str
    toolchain: dict[str, Any]
    profile: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)  # factory/loss names, source hashes
    # Not keyed (it follows from data and code): the canonical hash of the
    # decoded arrays trained on, recorded so that verify can re-decode and compare.
    decoded: dict[str, str] = field(default_factory=dict)

    def keyed(self) -> dict[str, Any]:
        """The inputs the run key covers: those its mode's bits depend on."""
        every = {"config": config_to_dict(self.config), "data": self.data, "code": self.code,
                 "model": self.model, "toolchain": self.toolchain, "profile": self.profile}
        return {f: every[f] for f in modes.of(self.config.mode).key_fields}

    @property
    def key(self) -> str:
        return hashlib.sha256(canonical_json(self.keyed())).hexdigest()


def run_inputs(cfg: Config, data: dict[str, Any], profile: dict[str, Any],
               model: dict[str, Any], decoded: dict[str, str] | None = None) -> RunInputs:
    from ..core.environment import code_sha256, toolchain_fingerprint
    return RunInputs(cfg, data, code_sha256(), toolchain_fingerprint(), profile, model,
                     decoded or {})


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


def read_run(run_dir: Path) -> dict[str, Any]:
    """run.json of a run directory, checked against itself (record_sha256),
    its directory name (the run key) and its weights file."""
    from ..core.hashing import weights_sha256
    from ..train.checkpoint import read_safetensors

    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    record = load_record(path)
    if _KEY.fullmatch(run_dir.name) and record.get("run_key") != run_dir.name:
        raise CheckpointError(f"{path} [run_key]", f"the directory's key {run_dir.name}",
                              str(record.get("run_key")), "a run copied under another key")
    weights = run_dir / "weights.safetensors"
    tensors, _ = read_safetensors(weights)
    layout = _layout(tensors)
    if layout != record.get("weights_layout"):
        raise CheckpointError(str(weights), f"the tensors run.json lists "
                              f"{record.get('weights_layout')}", f"{layout}",
                              "the weights file was replaced or tampered with")
    actual = weights_sha256(tensors)
    if actual != record["weights_sha256"]:
        raise CheckpointError(str(weights), f"weights sha256:{record['weights_sha256']} "
                              f"(run.json)", f"sha256:{actual}",
                              "the weights file was replaced or tampered with")
    return record


def reusable(run_dir: Path, inputs: RunInputs) -> dict[str, Any]:
    """The record of complete run ``run_dir`` if it is the run of ``inputs``:
    read_run's checks, then every keyed input it records equal to the one
    computed now (not trusted from its key). Else CheckpointError naming
    run.json and the field."""
    record = read_run(run_dir)
    now = {"run_key": inputs.key, "config": config_to_dict(inputs.config),
           "data": inputs.data, "code_sha256": inputs.code, "toolchain": inputs.toolchain,
           "profile": inputs.profile, "model": inputs.model,
           "key_inputs": sorted(inputs.keyed()),
           "data_decoded": inputs.decoded}
    field_of = {"config": "config", "data": "data", "code": "code_sha256", "model": "model",
                "toolchain": "toolchain", "profile": "profile"}
    fields = ["run_key", "key_inputs", *(field_of[f] for f in sorted(inputs.keyed()))]
    for name in fields + (["data_decoded"] if inputs.decoded else []):
        if record.get(name) != now[name]:
            diff = _differences(record.get(name), now[name], name)[:1]
            found = f"{diff[0][0]} = {json.dumps(diff[0][1])[:120]}" if diff else "?"
            raise CheckpointError(f"{run_dir / 'run.json'} [{name}]",
                                  f"the {name} computed now", found,
                                  "not this run's record; rerun with --force to replace it")
    return record


def _layout(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Name -> dtype and shape: what run.json promises about weights.safetensors."""
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
            for k, v in tensors.items()}


def write_run(final: Path, inputs: RunInputs, result: Any, started: float,
              extra: dict[str, Any]) -> dict[str, Any]:
    """Write every file into a temporary sibling, then rename it to ``final``."""
    from safetensors.torch import save

    from ..core.hashing import weights_sha256

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name[:16]}-"))
    try:
        weights = save(result.params)
        atomic.write_bytes(tmp / "weights.safetensors", weights)
        atomic.write_bytes(tmp / "trail.bin", result.trail)
        atomic.write_text(tmp / "metrics.jsonl",
                          "".join(json.dumps(m, sort_keys=True) + "\n" for m in result.metrics))
        plot_curves(tmp / "curves.png", result.metrics)
        last = result.metrics[-1] if result.metrics else {}
        record = {
            "run_key": inputs.key,
            "weights_sha256": weights_sha256(result.params),
            "weights_layout": _layout(result.params),
            "mode": inputs.config.mode,
            "config": config_to_dict(inputs.config),
            "config_sha256": config_sha256(inputs.config),
            "data": inputs.data,
            "data_decoded": inputs.decoded,
            "code_sha256": inputs.code,
            "model": inputs.model,
            "toolchain": inputs.toolchain,
            "profile": inputs.profile,
            "key_inputs": sorted(inputs.keyed()),
            "metrics": {**{k: v for k, v in last.items() if k.startswith("test_")},
                        "train_loss": last.get("train_loss"), "steps": result.steps},
            "trail": {"file": "trail.bin", "digest_bytes": 8, "tensors": result.trail_names,
                      "kind": FINGERPRINT_KIND},
            "files": {"weights.safetensors": hashlib.sha256(weights).hexdigest()},
            "resumed_from_step": result.resumed_from,
            **_when(started, result.loop_s),  # kept out of the key: when and how long
            **extra,
        }
        record["record_sha256"] = record_digest(record)
        atomic.write_text(tmp / "run.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
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


def list_runs(runs_dir: Path) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
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


def input_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """One line per differing input of two run records (config, data, code,
    toolchain, profile), naming the dotted key and both values."""
    lines = []
    for name, label in (("config", "config"), ("data", "data"), ("code_sha256", "code"),
                        ("model", "model"), ("toolchain", "toolchain"), ("profile", "profile")):
        for path, va, vb in _differences(a.get(name), b.get(name), label):
            lines.append(f"{path}: {json.dumps(va)} != {json.dumps(vb)}")
    return lines


def diff_runs(a: dict[str, Any], b: dict[str, Any], trail_a: bytes, trail_b: bytes) -> list[str]:
    """Lines naming the differing inputs, then where the trails diverge."""
    lines = input_differences(a, b)
    ka, kb = (r["trail"].get("kind", "sha1-8") for r in (a, b))
    if ka != kb:  # two definitions of the per-step fingerprint
        return [*lines, f"trails not comparable: fingerprints of kinds {ka} and {kb}"]
    names, d = a["trail"]["tensors"], a["trail"]["digest_bytes"]
    steps = min(len(trail_a), len(trail_b)) // (len(names) * d)
    where = first_divergence(names, d, trail_a, trail_b)
    if where is not None:
        lines.append(f"trails diverge at step {where[0]} (of {steps}), first tensor {where[1]}")
    elif len(trail_a) != len(trail_b):
        lines.append(f"trails agree for {steps} steps, then one run stops")
    else:
        lines.append(f"trails identical for all {steps} steps")
    return lines


def first_divergence(names: list[str], digest_bytes: int, trail_a: bytes,
                     trail_b: bytes) -> tuple[int, str] | None:
    """(step, tensor) where two trails (``digest_bytes`` per tensor per step,
    tensors in ``names`` order) first differ, steps counted from 1; None if
    they agree for as long as both go. ``pipeline diff`` and ``pipeline audit``
    both locate divergence with it."""
    width = len(names) * digest_bytes
    for s in range(min(len(trail_a), len(trail_b)) // width):
        ra, rb = trail_a[s * width:(s + 1) * width], trail_b[s * width:(s + 1) * width]
        if ra != rb:
            t = next(i for i in range(len(names))
                     if ra[i * digest_bytes:(i + 1) * digest_bytes]
                     != rb[i * digest_bytes:(i + 1) * digest_bytes])
            return s + 1, names[t]
    return None


def _differences(va: Any, vb: Any, path: str) -> list[tuple[str, Any, Any]]:
    if isinstance(va, dict) and isinstance(vb, dict):
        out = []
        for k in sorted(set(va) | set(vb)):
            out += _differences(va.get(k), vb.get(k), f"{path}.{k}")
        return out
    return [] if va == vb else [(path, va, vb)]
