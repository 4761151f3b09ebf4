"""Golden weight hashes across real machines: tests/golden/weights.json.

An entry maps (config, mode, toolchain fingerprint, numeric profile) to the
weight hash one machine produced. Every suite run compares this machine's
hash with the entry for its key, so a second machine (CI, a colleague's
laptop, a GPU host) checks the first. Exact-mode entries are keyed by the
config alone: their bits do not depend on the toolchain or the machine. The
key follows the record's own ``key_inputs`` (what its mode keyed, pipeline.modes),
so the golden key and the run key cover the same inputs.
Add entries with ``pipeline golden add RUN_DIR`` (``--force`` to replace a
differing one).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..core import atomic
from ..core.config import canonical_json
from ..core.errors import MismatchError, UsageError
from ..core.safeio import MIB, read_regular
from .schema import RunRecord

__all__ = ["golden_key", "lookup", "add", "check", "default_path"]


def default_path() -> Path:
    from ..core.environment import project_root
    return project_root() / "tests" / "golden" / "weights.json"


def golden_key(record: RunRecord) -> dict[str, str]:
    """The key of a run record's golden entry: its mode and config, and the
    toolchain and profile only where its run key covers them."""
    def digest(value: Any) -> str:
        return hashlib.sha256(canonical_json(value)).hexdigest()
    key = {"mode": record.mode, "config_sha256": record.config_sha256 or "",
           "toolchain": "any", "profile": "any"}
    if "toolchain" in record.key_inputs:
        key["toolchain"] = digest(record.toolchain)
    if "profile" in record.key_inputs:
        key["profile"] = f"{record.profile.get('name')}:{digest(record.profile)[:16]}"
    if record.test_switches:  # a control run: never the entry of a real one
        key["test_switches"] = digest(record.test_switches)
    return key


def _load(path: Path) -> list[dict[str, Any]]:
    if not (path.exists() or path.is_symlink()):
        return []
    try:
        data = json.loads(read_regular(path, 16 * MIB))
        entries = data["entries"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TypeError("entries is not a list of objects")
        return entries
    except OSError as e:  # a FIFO, a device, too large
        raise UsageError(f"{path}: expected a golden file, found {e.strerror}") from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise UsageError(f"{path}: expected {{\"version\": 1, \"entries\": [...]}}, found "
                         f"malformed JSON ({e})") from None


def lookup(record: RunRecord, path: Path) -> dict[str, Any] | None:
    key = golden_key(record)
    return next((e for e in _load(path) if {k: e.get(k) for k in key} == key), None)


def add(record: RunRecord, path: Path, *, force: bool = False, note: str = "") -> str:
    """Add (or with ``force`` replace) this run's entry; return what happened."""
    key = golden_key(record)
    entries = _load(path)
    old = lookup(record, path)
    if old is not None and old["weights_sha256"] == record.weights_sha256:
        return "unchanged"
    if old is not None and not force:
        raise MismatchError(f"{path}: the entry for this key holds sha256:{old['weights_sha256']}"
                            f", this run gives sha256:{record.weights_sha256}; "
                            f"use --force to replace it")
    entries = [e for e in entries if e != old]  # old is a copy (lookup reloads the file)
    entries.append({**key, "weights_sha256": record.weights_sha256,
                    "toolchain_summary": f"{record.toolchain.get('torch')} "
                                         f"{record.toolchain.get('platform')} "
                                         f"{str(record.toolchain.get('lock', ''))[:24]}",
                    "note": note})
    entries.sort(key=lambda e: (e["config_sha256"], e["mode"], e["toolchain"], e["profile"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps({"version": 1, "entries": entries}, indent=2) + "\n")
    return "replaced" if old is not None else "added"


def check(record: RunRecord, path: Path) -> tuple[bool | None, str]:
    """(True, msg) on a match, (False, msg) on a mismatch, (None, msg) if no entry."""
    entry = lookup(record, path)
    if entry is None:
        return None, f"no golden entry for key {json.dumps(golden_key(record), sort_keys=True)}"
    if entry["weights_sha256"] == record.weights_sha256:
        return True, f"golden match sha256:{record.weights_sha256}"
    return False, (f"golden mismatch: expected sha256:{entry['weights_sha256']}, "
                   f"actual sha256:{record.weights_sha256}")
