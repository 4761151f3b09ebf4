"""metrics.jsonl of a run whose record was read: one JSON object per epoch
(and the last step), read within a bound, every value checked.

run.json's ``files`` holds the sha256 of metrics.jsonl (runs recorded since
it does), so any edit is caught; the file is also checked against the record
where the two overlap: its last line's step and metrics must be the record's
``metrics`` (the only check for an older record, which catches an edited or
truncated last line, not an earlier one).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import CheckpointError
from ..core.safeio import MIB, read_regular
from .schema import RunRecord

__all__ = ["Epoch", "read_metrics", "MAX_METRICS_BYTES"]

MAX_METRICS_BYTES = 64 * MIB


@dataclass(frozen=True)
class Epoch:
    """One line of metrics.jsonl: the step it was taken at and its numbers
    (``epoch``, ``train_loss``, and ``test_accuracy`` or ``test_loss``)."""

    step: int
    values: dict[str, float]


def read_metrics(run_dir: Path, record: RunRecord) -> list[Epoch]:
    """metrics.jsonl of ``run_dir``, each line an object of finite numbers with
    a non-negative integer ``step``, steps increasing, the last line equal to
    ``record.metrics``; else CheckpointError naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        text = read_regular(path, MAX_METRICS_BYTES).decode("utf-8")
    except OSError as e:
        raise CheckpointError(str(path), "the run's metrics (a regular file)",
                              e.strerror or str(e)) from None
    except UnicodeDecodeError as e:
        raise CheckpointError(str(path), "UTF-8 JSON lines", f"invalid UTF-8 ({e.reason})") from None
    want = (record.files or {}).get("metrics.jsonl")
    if want is not None and (got := hashlib.sha256(text.encode()).hexdigest()) != want:
        raise CheckpointError(str(path), f"sha256 {want} (run.json's files)", f"sha256 {got}",
                              "metrics.jsonl was edited or belongs to another run")
    epochs = [_epoch(line, f"{path}:{i}") for i, line in enumerate(text.splitlines(), 1)]
    for i, (a, b) in enumerate(itertools.pairwise(epochs), 2):
        if b.step <= a.step:
            raise CheckpointError(f"{path}:{i}", f"a step after {a.step}", str(b.step))
    _check_last(epochs, record, path)
    return epochs


def _epoch(line: str, where: str) -> Epoch:
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(where, "a JSON object", f"malformed ({e})") from None
    step = raw.get("step") if isinstance(raw, dict) else None
    if type(step) is not int or step < 0:
        raise CheckpointError(where, "an object with an integer step >= 0", line[:80])
    values: dict[str, float] = {}
    for k, v in raw.items():
        if k == "step":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise CheckpointError(f"{where} [{k}]", "a finite number", repr(v)[:80])
        values[k] = float(v)
    return Epoch(step, values)


def _check_last(epochs: list[Epoch], record: RunRecord, path: Path) -> None:
    """The last line is what run.json's ``metrics`` summarise."""
    want: dict[str, Any] = {k: v for k, v in record.metrics.items() if k != "steps"}
    if not epochs:
        if record.steps == 0:
            return
        raise CheckpointError(str(path), f"metrics up to step {record.steps}", "no lines")
    last = epochs[-1]
    got = {k: last.values.get(k) for k in want}
    if last.step != record.steps or got != want:
        raise CheckpointError(str(path), f"a last line at step {record.steps} with run.json's "
                              f"metrics {want}", f"step {last.step}, {got}",
                              "metrics.jsonl was edited or belongs to another run")
