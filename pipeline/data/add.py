"""``pipeline data add``: a manifest entry for a file, computed, checked and
written, never a half-written manifest.

The file's sha256 and size are computed here; its path is stored relative to
the manifest's directory (the data root), which must contain it. With
``--format`` the file also becomes a part (train or test) of a dataset, with
the decode options given; the dataset is decoded once to prove the entry
works before the manifest is replaced (atomically). An existing entry that
differs is only replaced with ``--force``.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from ..core import atomic
from ..core.errors import DataIntegrityError, UsageError
from . import schema
from .task import for_format

__all__ = ["add", "parse_options"]


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["label=64", "features=[0, 64]", "compression=gzip"]`` -> decode options
    (values parsed as TOML; a bare word is a string)."""
    out: dict[str, Any] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise UsageError(f"--decode {item!r}: expected KEY=VALUE")
        try:
            out[k.strip()] = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            out[k.strip()] = v
    return out


def _relative(file: Path, root: Path) -> str:
    resolved = file.resolve(strict=True)
    if not resolved.is_file():
        raise UsageError(f"{file}: expected a regular file, found something else")
    if not resolved.is_relative_to(root):
        raise UsageError(f"{file}: expected a file inside the data root {root} (the manifest's "
                         f"directory), found {resolved}; copy it there first")
    return resolved.relative_to(root).as_posix()


def _put(table: dict[str, Any], key: str, value: Any, where: str, force: bool) -> str:
    """Set ``table[key]``: "added", "unchanged", "replaced", or UsageError."""
    if key not in table:
        table[key] = value
        return "added"
    if table[key] == value:
        return "unchanged"
    if not force:
        raise UsageError(f"{where}: an entry exists and differs (existing "
                         f"{json.dumps(table[key], sort_keys=True)[:300]}); use --force to "
                         f"replace it")
    table[key] = value
    return "replaced"


def add(manifest: Path, file: Path, *, name: str, source: str, licence: str,
        description: str, fmt: str | None = None, dataset: str | None = None,
        part: str = "train", task: str | None = None, options: dict[str, Any] | None = None,
        force: bool = False) -> list[str]:
    """Add ``file`` (and, with ``fmt``, a dataset part) to ``manifest``; return
    what happened, one line per entry."""
    from . import dataset as dataset_mod
    from .manifest import file_sha256, load_manifest, verify

    manifest = Path(manifest)
    raw: dict[str, Any] = {"version": schema.MANIFEST_VERSION, "files": {}, "datasets": {}}
    if manifest.exists():
        load_manifest(manifest)  # it must be valid before it is edited
        raw = json.loads(manifest.read_text(encoding="utf-8"))
        raw.setdefault("datasets", {})
    root = manifest.parent.resolve()
    size = file.stat().st_size
    entry = {"path": _relative(file, root), "sha256": file_sha256(file, size), "size": size,
             "source": source, "licence": licence, "description": description}
    done = [f"{_put(raw['files'], name, entry, f'files.{name}', force)}: files.{name} "
            f"sha256:{entry['sha256']} ({entry['size']} bytes)"]
    if fmt is not None:
        ds = dataset or name
        spec = {"format": fmt, **({} if fmt in ("npy", "idx") else {"file": name}),
                **(options or {})}
        kind = task or for_format(fmt).name
        current = raw["datasets"].setdefault(ds, {"task": kind})
        if current.get("task") != kind and not force:
            raise UsageError(f"datasets.{ds}.task: is {current.get('task')!r}, this part "
                             f"needs {kind!r}; use --force to replace it")
        current["task"] = kind
        done.append(f"{_put(current, part, spec, f'datasets.{ds}.{part}', force)}: "
                    f"datasets.{ds}.{part} ({fmt})")
    blob = (json.dumps(raw, indent=2) + "\n").encode()
    tmp = manifest.with_name(f".{manifest.name}.check")
    try:  # the new manifest parses, verifies and decodes before it replaces the old
        tmp.write_bytes(blob)
        verified = verify(tmp)
        if fmt is not None:
            import tempfile
            with tempfile.TemporaryDirectory() as cache:
                dataset_mod.load(verified, dataset or name, Path(cache))
    except DataIntegrityError as e:
        raise DataIntegrityError(str(manifest), "an entry that verifies and decodes",
                                 f"{e}", "nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)
    atomic.write_bytes(manifest, blob)
    return done
