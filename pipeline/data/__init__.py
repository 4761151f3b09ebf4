"""The data path: the manifest (schema, verification, the stat cache, ``data
add``), the decoders per format, memory-mapped files, the decode cache, the
decoded ``Dataset`` and its ``Task`` (classification, lm), and sampling (the
split, each epoch's order, batches)."""

from __future__ import annotations

from ..core._lazy import exports

__all__ = ["Verified", "verify", "load_manifest", "Dataset", "load", "Task", "task_of", "split",
           "epoch_order", "batches"]

__getattr__ = exports(__name__, {
    "Verified": "manifest", "verify": "manifest", "load_manifest": "manifest",
    "Dataset": "dataset", "load": "dataset", "Task": "task", "task_of": "task",
    "split": "sampling", "epoch_order": "sampling", "batches": "sampling"})
