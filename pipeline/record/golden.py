"""Golden weight hashes across real machines: tests/golden/weights.json.

An entry maps (config, mode, toolchain fingerprint, numeric profile) to the
weight hash one machine produced. Every suite run compares this machine's
hash with the entry for its key, so a second machine (CI, a colleague's
laptop, a GPU host) checks the first. Exact-mode entries are keyed by the
config alone: their bits do not depend on the toolchain or the machine.
Add entries with ``pipeline golden add RUN_DIR`` (``--force`` to replace a
differing one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import modes
from ..core import atomic
from ..core.errors import MismatchError, UsageError
from ..core.safeio import MIB, read_regular

__all__ = ["golden_key", "lookup", "add", "check", "default_path"]


def default_path() -> Path:
    from ..core.environment import project_root
    return project_root() / "tests" / "golden" / "weights.json"


def golden_key(record: dict[str, Any]) -> dict[str, str]:
    """The key of a run record's golden entry (its mode decides: pipeline.modes)."""
    return modes.of(record["mode"]).golden_key(record)


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


def lookup(record: dict[str, Any], path: Path) -> dict[str, Any] | None:
    key = golden_key(record)
    return next((e for e in _load(path) if {k: e.get(k) for k in key} == key), None)


def add(record: dict[str, Any], path: Path, *, force: bool = False, note: str = "") -> str:
    """Add (or with ``force`` replace) this run's entry; return what happened."""
    key = golden_key(record)
    entries = _load(path)
    old = lookup(record, path)
    if old is not None and old["weights_sha256"] == record["weights_sha256"]:
        return "unchanged"
    if old is not None and not force:
        raise MismatchError(f"{path}: the entry for this key holds sha256:{old['weights_sha256']}"
                            f", this run gives sha256:{record['weights_sha256']}; "
                            f"use --force to replace it")
    entries = [e for e in entries if e != old]  # old is a copy (lookup reloads the file)
    entries.append({**key, "weights_sha256": record["weights_sha256"],
                    "toolchain_summary": f"{record['toolchain'].get('torch')} "
                                         f"{record['toolchain'].get('platform')} "
                                         f"{record['toolchain'].get('lock', '')[:24]}",
                    "note": note})
    entries.sort(key=lambda e: (e["config_sha256"], e["mode"], e["toolchain"], e["profile"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps({"version": 1, "entries": entries}, indent=2) + "\n")
    return "replaced" if old is not None else "added"


def check(record: dict[str, Any], path: Path) -> tuple[bool | None, str]:
    """(True, msg) on a match, (False, msg) on a mismatch, (None, msg) if no entry."""
    entry = lookup(record, path)
    if entry is None:
        return None, f"no golden entry for key {json.dumps(golden_key(record), sort_keys=True)}"
    if entry["weights_sha256"] == record["weights_sha256"]:
        return True, f"golden match sha256:{record['weights_sha256']}"
    return False, (f"golden mismatch: expected sha256:{entry['weights_sha256']}, "
                   f"actual sha256:{record['weights_sha256']}")
