"""``pipeline data add``: a manifest entry for a file, computed, checked and
written, never a half-written manifest.

The file's sha256 and size are computed here; its path is stored relative to
the manifest's directory (the data root), which must contain it. With
``--format`` the file also becomes a part (train or test) of a dataset, with
the decode options given. The manifest as edited is checked in memory before
anything is written: its schema (a bad option is a usage error, exit 2), its
files (verified), and every dataset the change touches (a dataset edited, or
one that reads a file entry whose path, size or sha256 changes) is decoded
once (exit 3 naming the dataset, if one no longer decodes). Only then is the
manifest replaced, atomically; a manifest that is a symbolic link is written
through (its target replaced, the link kept). An existing entry that differs
is only replaced with ``--force``.
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

from ..core import atomic
from ..core.errors import DataIntegrityError, UsageError
from ..core.safeio import describe, read_regular
from . import schema
from .schema import Manifest
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
    try:
        resolved = file.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # missing, a dangling link, a link loop
        raise UsageError(f"{file}: expected an existing regular file, found none "
                         f"({describe(e) if isinstance(e, OSError) else e})") from None
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


def _current(manifest: Path) -> dict[str, Any]:
    """The manifest as it is (it must be valid before it is edited), or a new one."""
    from .manifest import MAX_MANIFEST_BYTES, load_manifest

    if not manifest.exists():
        return {"version": schema.MANIFEST_VERSION, "files": {}, "datasets": {}}
    load_manifest(manifest)  # exit 3 naming the key if it is not
    raw = json.loads(read_regular(manifest, MAX_MANIFEST_BYTES))
    raw.setdefault("datasets", {})
    return dict(raw)


def _edited(raw: dict[str, Any], manifest: Path) -> Manifest:
    """The edited manifest parsed: its problems are this command line's (the
    manifest was valid before), so they are a usage error, all named."""
    if problems := schema.problems(raw):
        lines = "; ".join(f"{k}: expected {x}, found {f}" for k, x, f in problems)
        raise UsageError(f"{manifest}: the entry this command makes is invalid: {lines}; "
                         "nothing was written (decode keys: docs/reference/manifest.md)")
    return schema.parse(raw, str(manifest))


def _content(entry: object) -> object:
    """What identifies a file entry's bytes: its path, size and sha256."""
    return {k: entry.get(k) for k in ("path", "size", "sha256")} if isinstance(entry, dict) \
        else None


def _touched(old: dict[str, Any], new: dict[str, Any], parsed: Manifest
             ) -> dict[str, list[str]]:
    """dataset -> the changed files it reads, for each dataset edited or reading a
    file entry whose content changes."""
    changed = {n for n, e in new["files"].items() if _content(old["files"].get(n)) != _content(e)}
    return {d: sorted(changed & set(e.files())) for d, e in parsed.datasets.items()
            if old["datasets"].get(d) != new["datasets"][d] or changed & set(e.files())}


def _prove(manifest: Path, parsed: Manifest, touched: dict[str, list[str]],
           stat_cache_dir: Path | None = None) -> None:
    """Verify every file of the edited manifest and decode each touched dataset
    once (no cache read or written); DataIntegrityError naming the dataset."""
    from .dataset import check_decodes
    from .manifest import verify_parsed

    try:
        verified = verify_parsed(parsed, manifest, stat_cache_dir=stat_cache_dir)
    except DataIntegrityError as e:
        raise DataIntegrityError(str(manifest), "entries whose files verify", f"{e}",
                                 "nothing was written") from None
    for name, files in touched.items():
        try:
            check_decodes(verified, name)
        except DataIntegrityError as e:
            named = ", ".join(f"files.{f}" for f in files[:3]) + (
                f" and {len(files) - 3} more" if len(files) > 3 else "")
            reads = f" (it reads {named}, which this command changes)" if files else ""
            raise DataIntegrityError(f"{manifest} [datasets.{name}]",
                                     f"a dataset that decodes after this change{reads}",
                                     f"{e}", "nothing was written") from None


def _target(manifest: Path) -> Path:
    """Where the new manifest goes: a symbolic link is written through, so the
    link stays a link (the data root stays the link's directory, as verify reads it)."""
    return manifest.resolve() if manifest.is_symlink() else manifest


def add(manifest: Path, file: Path, *, name: str, source: str, licence: str,
        description: str, fmt: str | None = None, dataset: str | None = None,
        part: str = "train", task: str | None = None, options: dict[str, Any] | None = None,
        force: bool = False) -> list[str]:
    """Add ``file`` (and, with ``fmt``, a dataset part) to ``manifest``; return
    what happened, one line per entry."""
    manifest = Path(manifest)
    with _locked(manifest):  # read, edit, prove, write: one data add at a time
        return _add(manifest, Path(file), name=name, source=source, licence=licence,
                    description=description, fmt=fmt, dataset=dataset, part=part, task=task,
                    options=options, force=force)


def _locked(manifest: Path) -> Any:
    """An exclusive lock for editing ``manifest`` (its resolved target), held in
    the cache directory (nothing is left beside the manifest): two ``data add``
    runs at once would each write the manifest they read, and the first one's
    entries would be lost, silently."""
    import hashlib

    from filelock import FileLock

    from .manifest import default_cache_dir

    target = _target(manifest).resolve()
    locks = default_cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(target).encode()).hexdigest()[:24]
    return FileLock(str(locks / f"manifest-{digest}.lock"))


def _add(manifest: Path, file: Path, *, name: str, source: str, licence: str,
         description: str, fmt: str | None, dataset: str | None, part: str,
         task: str | None, options: dict[str, Any] | None, force: bool) -> list[str]:
    from .manifest import file_sha256

    if Path(file).is_dir():
        return _add_folder(manifest, Path(file), dataset=dataset or name, source=source,
                           licence=licence, description=description, part=part,
                           options=options or {}, force=force)
    old = _current(manifest)
    raw = copy.deepcopy(old)
    root = manifest.parent.resolve()
    path = _relative(file, root)
    size = file.stat().st_size
    entry = {"path": path, "sha256": file_sha256(file, size), "size": size,
             "source": source, "licence": licence, "description": description}
    done = [(f"{_put(raw['files'], name, entry, f'files.{name}', force)}: files.{name} "
             f"sha256:{entry['sha256']} ({entry['size']} bytes)")]
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
    return done + _write(manifest, old, raw)


def _write(manifest: Path, old: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """Check the edited manifest (schema, files, touched datasets decode), then
    replace it atomically."""
    from .manifest import default_cache_dir

    done = []
    parsed = _edited(raw, manifest)
    _prove(manifest, parsed, _touched(old, raw, parsed), default_cache_dir())
    target = _target(manifest)
    if target != manifest:
        done.append(f"{manifest} is a symbolic link: wrote its target {target}")
    atomic.write_bytes(target, (json.dumps(raw, indent=2) + "\n").encode())
    return done


def _add_folder(manifest: Path, directory: Path, *, dataset: str, source: str, licence: str,
                description: str, part: str, options: dict[str, Any], force: bool) -> list[str]:
    """``data add DIR``: every image file's entry, and the images part of ``dataset``
    (pipeline.data.folders)."""
    from .folders import file_entries, scan
    from .manifest import default_cache_dir

    old = _current(manifest)
    raw = copy.deepcopy(old)
    root = manifest.parent.resolve()
    folder = scan(directory, root, indexed="index" in options)
    entries = file_entries(folder, source=source, licence=licence, description=description,
                           stat_cache_dir=default_cache_dir())
    counts: dict[str, int] = {}
    gone = _gone(raw["files"], folder, entries)
    if gone and not force:
        raise UsageError(f"files.{gone[0]}: its image {raw['files'][gone[0]]['path']} is no "
                         f"longer under {folder.root}/ ({len(gone)} such entries); use --force "
                         f"to remove their entries")
    for n in gone:
        del raw["files"][n]
        counts["removed"] = counts.get("removed", 0) + 1
    for n, e in entries.items():
        if _content(raw["files"].get(n)) == _content(e):  # the same bytes: keep its metadata
            counts["unchanged"] = counts.get("unchanged", 0) + 1
            continue
        how = _put(raw["files"], n, e, f"files.{n}", force)
        counts[how] = counts.get(how, 0) + 1
    spec = {"format": "images", "root": folder.root,
            "classes": _index_classes(raw, root, options) if "index" in options
            else folder.classes, **options}
    kind = for_format("images").name
    current = raw["datasets"].setdefault(dataset, {"task": kind})
    if current.get("task") != kind and not force:
        raise UsageError(f"datasets.{dataset}.task: is {current.get('task')!r}, an images part "
                         f"needs {kind!r}; use --force to replace it")
    current["task"] = kind
    done = [f"{how}: {k} image file entries under {folder.root}/"
            for how, k in sorted(counts.items())]
    if folder.skipped:
        done.append(f"skipped {folder.skipped} files without an image extension "
                    "(.png, .jpg, .jpeg, .webp)")
    done.append(f"{_put(current, part, spec, f'datasets.{dataset}.{part}', force)}: "
                f"datasets.{dataset}.{part} (images, {len(spec.get('classes', []))} classes)")
    return done + _write(manifest, old, raw)


def _gone(files: dict[str, Any], folder: Any, entries: dict[str, Any]) -> list[str]:
    """Entries of image files under the folder's root that it no longer holds."""
    from .images import is_image

    prefix = "" if folder.root == "." else folder.root + "/"
    return sorted(n for n, e in files.items() if isinstance(e, dict) and n not in entries
                  and str(e.get("path", "")).startswith(prefix) and is_image(str(e["path"])))


def _index_classes(raw: dict[str, Any], root: Path, options: dict[str, Any]) -> list[str]:
    """The sorted labels an index names (the spec's ``classes`` unless given)."""
    from .images import index_rows

    if "classes" in options:
        return list(options["classes"])
    entry = raw["files"].get(options["index"])
    if not isinstance(entry, dict):
        raise UsageError(f"--decode index={options['index']!r}: expected the name of a file "
                         f"entry (add the index with `pipeline data add FILE --name NAME` "
                         f"first), found none")
    return sorted({label for _, label, _ in index_rows(root / entry["path"])})
