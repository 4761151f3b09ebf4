"""run.json as a file: read within a bound, its types checked, its own
digest (``record_sha256``) checked, so that an edited field is caught before
anything reads it. Whether a record is *this run's* is runs.reusable's
question; this module only says whether it is a well-formed, unedited one.

The digest is no signature: whoever can write run.json can recompute it.
It catches edits that do not recompute it (a changed metric, a hand-fixed
field); what stands behind a record's outputs is ``pipeline verify``, which
retrains and compares the weights and the metrics (docs: the threat model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import MODES
from ..core.errors import CheckpointError
from ..core.safeio import MIB, read_regular

__all__ = ["RunRecord", "Trail", "load_record", "record_digest", "MAX_RECORD_BYTES"]

MAX_RECORD_BYTES = 64 * MIB  # run.json


def record_digest(record: dict[str, Any]) -> str:
    """sha256 over the record's canonical JSON without its own digest field."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


@dataclass(frozen=True)
class Trail:
    """run.json "trail": trail.bin holds ``digest_bytes`` per tensor per step,
    tensors in ``tensors`` order; ``kind`` names the fingerprint's definition."""

    tensors: tuple[str, ...]
    digest_bytes: int
    kind: str | None = None   # absent from records written before kinds were recorded
    file: str | None = None

    @property
    def fingerprint(self) -> str:
        """The fingerprint's definition (SHA-1 prefixes for the oldest records)."""
        return self.kind or "sha1-8"


@dataclass(frozen=True)
class RunRecord:
    """A run's record (run.json), typed. Input fields are named by
    pipeline.record.inputs.INPUT_FIELDS; ``field(name)`` reads one by that name.
    A field absent from the file is None here and absent when written, so that
    ``to_json`` gives back the file's own fields (and digest)."""

    run_key: str
    weights_sha256: str
    weights_layout: dict[str, Any]
    mode: str
    config: dict[str, Any]
    data: dict[str, Any]
    toolchain: dict[str, Any]
    profile: dict[str, Any]
    key_inputs: tuple[str, ...]
    metrics: dict[str, Any]        # test_accuracy or test_loss, train_loss, steps
    trail: Trail
    config_sha256: str | None = None
    code_sha256: str | None = None
    model: dict[str, Any] | None = None
    data_decoded: dict[str, Any] | None = None
    test_switches: dict[str, Any] | None = None  # test-only switches in force (pipeline.core._testing)
    files: dict[str, str] | None = None
    resumed_from_step: int | None = None
    # How and when it ran: recorded, never keyed.
    created_utc: str | None = None
    duration_s: float | None = None
    loop_s: float | None = None
    config_dir: str | None = None
    device: str | None = None
    world_size: int | None = None
    threads: dict[str, Any] | None = None
    parameters: dict[str, Any] | None = None  # frozen, tied (alias -> saved name), buffers
    # Fields this version does not know (a newer writer's): kept as they are.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.metrics["steps"])

    def field(self, name: str) -> Any:
        """The value of run.json field ``name`` (None if absent)."""
        if name in _NAMES:
            return getattr(self, name)
        return self.extra.get(name)

    def to_json(self) -> dict[str, Any]:
        """The record as run.json holds it, its own digest included."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "extra" or v is None:
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
        out["trail"] = {k: list(v) if isinstance(v, tuple) else v
                        for k, v in dataclasses.asdict(self.trail).items() if v is not None}
        out["record_sha256"] = record_digest(out)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: str) -> RunRecord:
        """``raw`` (a parsed run.json) checked field by field; CheckpointError
        naming ``where`` and the first field of the wrong type."""
        if (bad := _schema_problem(raw)) is not None:
            raise CheckpointError(f"{where} [{bad[0]}]", bad[1], repr(raw.get(bad[0]))[:80],
                                  "rerun with --force to replace the run")
        known = {k: v for k, v in raw.items() if k in _NAMES and k != "extra"}
        t = raw["trail"]
        known["trail"] = Trail(tuple(t["tensors"]), t["digest_bytes"], t.get("kind"),
                               t.get("file"))
        known["key_inputs"] = tuple(raw["key_inputs"])
        extra = {k: v for k, v in raw.items() if k not in _NAMES and k != "record_sha256"}
        return cls(**known, extra=extra)


_NAMES = {f.name for f in dataclasses.fields(RunRecord)}

# What the pipeline reads from a record, by type: checked before anything reads it.
_SCHEMA: dict[str, tuple[type | tuple[type, ...], str]] = {
    "run_key": (str, "a run key"), "weights_sha256": (str, "a sha256"),
    "weights_layout": (dict, "an object"), "mode": (str, "a mode name"),
    "config": (dict, "an object"), "data": (dict, "an object"), "metrics": (dict, "an object"),
    "trail": (dict, "an object"), "toolchain": (dict, "an object"),
    "profile": (dict, "an object"), "key_inputs": (list, "a list")}
# Optional fields: checked when present.
_OPTIONAL: dict[str, tuple[type | tuple[type, ...], str]] = {
    "config_sha256": (str, "a sha256"), "code_sha256": (str, "a sha256"),
    "model": (dict, "an object"), "data_decoded": (dict, "an object"),
    "test_switches": (dict, "an object"), "files": (dict, "an object"),
    "resumed_from_step": (int, "an integer"), "created_utc": (str, "a time"),
    "duration_s": ((int, float), "a number"), "loop_s": ((int, float), "a number"),
    "config_dir": (str, "a directory"), "device": (str, "a device"),
    "world_size": (int, "an integer"), "threads": (dict, "an object"),
    "parameters": (dict, "an object")}


def _schema_problem(record: dict[str, Any]) -> tuple[str, str] | None:
    """(field, what was expected) for the first field of the wrong type, or None."""
    for k, (tp, what) in _SCHEMA.items():
        if not isinstance(record.get(k), tp) or isinstance(record.get(k), bool):
            return k, what
    for k, (tp, what) in _OPTIONAL.items():
        if k in record and (not isinstance(record[k], tp) or isinstance(record[k], bool)):
            return k, what
    if not all(isinstance(k, str) for k in record["key_inputs"]):
        return "key_inputs", "a list of input names"
    if record["mode"] not in MODES:
        return "mode", f"one of {list(MODES)}"
    m, t = record["metrics"], record["trail"]
    for k, v in m.items():  # test_accuracy, test_loss, train_loss: printed as numbers
        if k != "steps" and v is not None and (isinstance(v, bool)
                                               or not isinstance(v, (int, float))
                                               or not math.isfinite(v)):
            return "metrics", f"{k} a finite number"
    if type(m.get("steps")) is not int or m["steps"] < 0:
        return "metrics", "steps a non-negative integer"
    names, width = t.get("tensors"), t.get("digest_bytes")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
            and type(width) is int and 0 < width <= 32
            and isinstance(t.get("kind", ""), str) and isinstance(t.get("file", ""), str)):
        return "trail", "tensors (names) and digest_bytes (1..32)"
    return None


def load_record(path: Path) -> RunRecord:
    """run.json parsed, its own digest checked (an edited field is caught), typed."""
    try:
        raw = json.loads(read_regular(path, MAX_RECORD_BYTES))
        if not isinstance(raw, dict):
            raise TypeError(f"a JSON {type(raw).__name__}")
        recorded = raw["weights_sha256"]
    except FileNotFoundError:
        raise CheckpointError(str(path), "a run record", "no such file",
                              "is this a runs/<key> directory?") from None
    except OSError as e:  # a FIFO, device or directory; too large
        raise CheckpointError(str(path), "a run record (a regular file)",
                              e.strerror or str(e)) from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(str(path), "a JSON run record with weights_sha256",
                              f"malformed ({e!r})") from None
    record = RunRecord.from_json(raw, str(path))
    if not isinstance(recorded, str) or raw.get("record_sha256") != record_digest(raw):
        raise CheckpointError(f"{path} [record_sha256]", "the digest of the record's content",
                              f"{str(raw.get('record_sha256'))[:64]}",
                              "run.json was edited (or predates record digests); "
                              "rerun with --force to replace the run")
    return record
