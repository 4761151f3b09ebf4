"""Shared by the data tests: a private copy of the shipped manifest and data."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from . import ROOT

SHA = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
DIGITS = ROOT / "data" / "digits.csv.gz"  # the shipped file whose sha256 is SHA


def make_manifest(tmp_path: Path) -> Path:
    """A private copy of the shipped manifest's digits file and dataset, and the
    file, under tmp_path/root."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    raw = json.loads((ROOT / "data-manifest.json").read_text())
    raw["files"] = {"digits": raw["files"]["digits"]}
    raw["datasets"] = {"digits": raw["datasets"]["digits"]}
    (root / "data-manifest.json").write_text(json.dumps(raw, indent=2))
    shutil.copy(ROOT / "data" / "digits.csv.gz", root / "data" / "digits.csv.gz")
    return root / "data-manifest.json"


def edit_manifest(manifest: Path, **fields: Any) -> None:
    raw = json.loads(manifest.read_text())
    raw["files"]["digits"].update(fields)
    manifest.write_text(json.dumps(raw))


def register(manifest: Path, payload: bytes, rows: int) -> None:
    """Replace the digits file by ``payload`` and make the manifest promise it
    (and ``rows`` rows)."""
    (manifest.parent / "data" / "digits.csv.gz").write_bytes(payload)
    edit_manifest(manifest, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    raw = json.loads(manifest.read_text())
    raw["datasets"]["digits"]["train"]["rows"] = rows
    manifest.write_text(json.dumps(raw))

