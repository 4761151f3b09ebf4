"""``pipeline export RUN_DIR --to tensorboard DIR``: every metric of
metrics.jsonl as TensorBoard scalars, in event files under ``DIR/<run_key>/``
(one TensorBoard run per pipeline run, so that ``tensorboard --logdir DIR``
compares them). Written with TensorBoard's own event-file writer (no torch,
no TensorFlow) into a temporary sibling and renamed into place: exporting a
run again replaces its directory whole. Every event's wall time is the run's
``created_utc``, so the scalars carry no time of export.
"""

from __future__ import annotations

import calendar
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..core import atomic
from ..record.metrics import read_metrics
from ..record.runs import read_run
from ..record.schema import RunRecord
from .extras import require

__all__ = ["export_tensorboard", "TensorBoardExport"]


@dataclass(frozen=True)
class TensorBoardExport:
    """Where the event files went and how many scalars they hold, per tag."""

    directory: Path
    scalars: dict[str, int]


def created_s(record: RunRecord) -> float:
    """run.json's ``created_utc`` in seconds since 1970 (0 if absent)."""
    if not record.created_utc:
        return 0.0
    return float(calendar.timegm(time.strptime(record.created_utc, "%Y-%m-%dT%H:%M:%SZ")))


def export_tensorboard(run_dir: Path, logdir: Path) -> TensorBoardExport:
    """Write the run's metrics as scalars under ``logdir/<run_key>``."""
    require("tensorboard", "export --to tensorboard")
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    record = read_run(run_dir)
    epochs = read_metrics(run_dir, record)
    logdir.mkdir(parents=True, exist_ok=True)
    final = logdir / record.run_key
    tmp = Path(tempfile.mkdtemp(dir=logdir, prefix=f".tmp-{record.run_key[:16]}-"))
    counts: dict[str, int] = {}
    try:
        writer = EventFileWriter(str(tmp))
        wall = created_s(record)
        for e in epochs:
            for tag, value in sorted(e.values.items()):
                value_pb = Summary.Value(tag=tag, simple_value=value)
                writer.add_event(Event(wall_time=wall, step=e.step,
                                       summary=Summary(value=[value_pb])))
                counts[tag] = counts.get(tag, 0) + 1
        writer.close()
        _replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TensorBoardExport(final, counts)


def _replace(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``, a previous export moved aside first."""
    old = None
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        old = final.with_name(f".old-{final.name[:16]}-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    atomic.fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
