"""A run's record: the inputs that decide its weights and the key derived from
them (``RunInputs``), run.json as a typed ``RunRecord``, the run directory
(read, write, reuse re-derived, lock, list), the per-step trail, what differs
between two runs, golden hashes, the loss curves, and metrics.jsonl read back."""

from __future__ import annotations

from ..core._lazy import exports

__all__ = ["RunInputs", "INPUT_FIELDS", "RunRecord", "load_record", "read_run", "reusable",
           "write_run", "list_runs", "diff_runs", "golden_key", "Epoch", "read_metrics"]

__getattr__ = exports(__name__, {
    "RunInputs": "inputs", "INPUT_FIELDS": "inputs", "RunRecord": "schema",
    "load_record": "schema", "read_run": "runs", "reusable": "runs", "write_run": "runs",
    "list_runs": "runs", "diff_runs": "diff", "golden_key": "golden", "Epoch": "metrics",
    "read_metrics": "metrics"})
