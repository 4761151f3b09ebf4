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
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from . import atomic, modes
from .config import Config, canonical_json, config_sha256, config_to_dict
from .errors import CheckpointError, MismatchError, UsageError

__all__ = ["RunInputs", "run_inputs", "is_complete", "read_run", "write_run", "run_lock",
           "clean_leftovers", "diff_runs", "first_divergence", "input_differences"]


@dataclass(frozen=True)
class RunInputs:
    """Everything that decides the weights, and the key derived from it."""
    config: Config
    data: dict[str, Any]
    code: str
    toolchain: dict[str, Any]
    profile: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)  # factory/loss names, source hashes

    def keyed(self) -> dict[str, Any]:
        """The inputs the run key covers: those its mode's bits depend on."""
        every = {"config": config_to_dict(self.config), "data": self.data, "code": self.code,
                 "model": self.model, "toolchain": self.toolchain, "profile": self.profile}
        return {f: every[f] for f in modes.of(self.config.mode).key_fields}

    @property
    def key(self) -> str:
        return hashlib.sha256(canonical_json(self.keyed())).hexdigest()


def run_inputs(cfg: Config, data: dict[str, Any], profile: dict[str, Any],
               model: dict[str, Any]) -> RunInputs:
    from .environment import code_sha256, toolchain_fingerprint
    return RunInputs(cfg, data, code_sha256(), toolchain_fingerprint(), profile, model)


def is_complete(run_dir: Path) -> bool:
    return (run_dir / "run.json").is_file() and (run_dir / "weights.safetensors").is_file()


def read_run(run_dir: Path) -> dict[str, Any]:
    """run.json of a run directory, checked against its weights file."""
    from .checkpoint import read_safetensors
    from .hashing import weights_sha256

    path = Path(run_dir) / "run.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        recorded = record["weights_sha256"]
    except FileNotFoundError:
        raise CheckpointError(str(path), "a run record", "no such file",
                              "is this a runs/<key> directory?") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(str(path), "a JSON run record with weights_sha256",
                              f"malformed ({e})") from None
    weights = Path(run_dir) / "weights.safetensors"
    tensors, _ = read_safetensors(weights)
    layout = _layout(tensors)
    if "weights_layout" not in record:
        raise CheckpointError(str(path), "a weights_layout entry", "none",
                              "the record predates weights_layout; retrain the run")
    if layout != record["weights_layout"]:
        raise CheckpointError(str(weights), f"the tensors run.json lists "
                              f"{record.get('weights_layout')}", f"{layout}",
                              "the weights file was replaced or tampered with")
    actual = weights_sha256(tensors)
    if actual != recorded:
        raise MismatchError(f"{run_dir}/weights.safetensors: recorded weights sha256:{recorded}, "
                            f"file holds sha256:{actual}")
    return record


def _layout(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Name -> dtype and shape: what run.json promises about weights.safetensors."""
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
            for k, v in tensors.items()}


def write_run(final: Path, inputs: RunInputs, result: Any, started: float,
              extra: dict[str, Any]) -> dict[str, Any]:
    """Write every file into a temporary sibling, then rename it to ``final``."""
    from safetensors.torch import save

    from .hashing import weights_sha256

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name[:16]}-"))
    try:
        weights = save(result.params)
        atomic.write_bytes(tmp / "weights.safetensors", weights)
        atomic.write_bytes(tmp / "trail.bin", result.trail)
        atomic.write_text(tmp / "metrics.jsonl",
                          "".join(json.dumps(m, sort_keys=True) + "\n" for m in result.metrics))
        _plot(tmp / "curves.png", result.metrics)
        last = result.metrics[-1] if result.metrics else {}
        record = {
            "run_key": inputs.key,
            "weights_sha256": weights_sha256(result.params),
            "weights_layout": _layout(result.params),
            "mode": inputs.config.mode,
            "config": config_to_dict(inputs.config),
            "config_sha256": config_sha256(inputs.config),
            "data": inputs.data,
            "code_sha256": inputs.code,
            "model": inputs.model,
            "toolchain": inputs.toolchain,
            "profile": inputs.profile,
            "key_inputs": sorted(inputs.keyed()),
            "metrics": {**{k: v for k, v in last.items() if k.startswith("test_")},
                        "train_loss": last.get("train_loss"), "steps": result.steps},
            "trail": {"file": "trail.bin", "digest_bytes": 8, "tensors": result.trail_names},
            "files": {"weights.safetensors": hashlib.sha256(weights).hexdigest()},
            "resumed_from_step": result.resumed_from,
            **_when(started),  # kept out of the key: when and how long, not what
            **extra,
        }
        atomic.write_text(tmp / "run.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        if final.exists():  # --rebuild into an existing key never reaches here
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic.fsync_dir(final.parent)
        return record
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _when(started: float) -> dict[str, Any]:
    """run.json's created_utc and duration_s. With SOURCE_DATE_EPOCH set (the
    reproducible-builds convention, https://reproducible-builds.org/specs/source-date-epoch/;
    nixpkgs' stdenv sets it in every derivation) created_utc is that time and duration_s is
    left out, so that two builds of one run write the same bytes (`nix build --rebuild`)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return {"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "duration_s": round(time.time() - started, 3)}
    if not epoch.isdigit():
        raise UsageError(f"SOURCE_DATE_EPOCH: expected a non-negative integer (seconds since "
                         f"1970), found {epoch!r}")
    return {"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))}


def _plot(path: Path, metrics: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(6, 4))
    steps = [m["step"] for m in metrics]
    ax1.plot(steps, [m["train_loss"] for m in metrics], color="tab:blue", label="train loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss", color="tab:blue")
    test = "test_accuracy" if metrics and "test_accuracy" in metrics[0] else "test_loss"
    ax2 = ax1.twinx()
    ax2.plot(steps, [m.get(test) for m in metrics], color="tab:red", label=test)
    ax2.set_ylabel(test.replace("_", " "), color="tab:red")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


@contextlib.contextmanager
def run_lock(runs_dir: Path, key: str) -> Iterator[None]:
    """Hold the file lock of run ``key``: concurrent trainers of one key
    serialise on it; the OS drops the lock of a killed holder, so a stale
    lock never blocks."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(runs_dir / f".{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting: another process is training run {key[:16]}", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


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
