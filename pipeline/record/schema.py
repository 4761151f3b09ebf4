"""run.json as a file: read within a bound, its types checked, its own
digest (``record_sha256``) checked, so that an edited field is caught before
anything reads it. Whether a record is *this run's* is runs.reusable's
question; this module only says whether it is a well-formed, unedited one.

The digest is no signature: whoever can write run.json can recompute it.
It catches edits that do not recompute it (a changed metric, a hand-fixed
field); what stands behind a record's outputs is ``pipeline verify``, which
retrains and compares the weights and the metrics (README, "Threat model").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..core.errors import CheckpointError
from ..core.safeio import MIB, read_regular

__all__ = ["load_record", "record_digest", "MAX_RECORD_BYTES"]

MAX_RECORD_BYTES = 64 * MIB  # run.json


def record_digest(record: dict[str, Any]) -> str:
    """sha256 over the record's canonical JSON without its own digest field."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


# What the pipeline reads from a record, by type: checked before anything reads it.
_SCHEMA: dict[str, tuple[type, str]] = {
    "run_key": (str, "a run key"), "weights_sha256": (str, "a sha256"),
    "weights_layout": (dict, "an object"), "mode": (str, "a mode name"),
    "config": (dict, "an object"), "data": (dict, "an object"), "metrics": (dict, "an object"),
    "trail": (dict, "an object"), "toolchain": (dict, "an object"),
    "profile": (dict, "an object"), "key_inputs": (list, "a list")}


def _schema_problem(record: dict[str, Any]) -> tuple[str, str] | None:
    """(field, what was expected) for the first field of the wrong type, or None."""
    for k, (tp, what) in _SCHEMA.items():
        if not isinstance(record.get(k), tp):
            return k, what
    m, t = record["metrics"], record["trail"]
    for k, v in m.items():  # test_accuracy, test_loss, train_loss: printed as numbers
        if k != "steps" and v is not None and (isinstance(v, bool)
                                               or not isinstance(v, (int, float))):
            return "metrics", f"{k} a number"
    if type(m.get("steps")) is not int or m["steps"] < 0:
        return "metrics", "steps a non-negative integer"
    names, width = t.get("tensors"), t.get("digest_bytes")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
            and type(width) is int and 0 < width <= 32):
        return "trail", "tensors (names) and digest_bytes (1..32)"
    return None


def load_record(path: Path) -> dict[str, Any]:
    """run.json parsed, its own digest checked (an edited field is caught)."""
    try:
        record = json.loads(read_regular(path, MAX_RECORD_BYTES))
        if not isinstance(record, dict):
            raise TypeError(f"a JSON {type(record).__name__}")
        recorded = record["weights_sha256"]
    except FileNotFoundError:
        raise CheckpointError(str(path), "a run record", "no such file",
                              "is this a runs/<key> directory?") from None
    except OSError as e:  # a FIFO, device or directory; too large
        raise CheckpointError(str(path), "a run record (a regular file)",
                              e.strerror or str(e)) from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(str(path), "a JSON run record with weights_sha256",
                              f"malformed ({e!r})") from None
    if (bad := _schema_problem(record)) is not None:
        raise CheckpointError(f"{path} [{bad[0]}]", bad[1], repr(record.get(bad[0]))[:80],
                              "rerun with --force to replace the run")
    if not isinstance(recorded, str) or record.get("record_sha256") != record_digest(record):
        raise CheckpointError(f"{path} [record_sha256]", "the digest of the record's content",
                              f"{str(record.get('record_sha256'))[:64]}",
                              "run.json was edited (or predates record digests); "
                              "rerun with --force to replace the run")
    return record
