"""``pipeline data add DIR``: an image folder's manifest entries.

Each image file under ``DIR`` (``.png``, ``.jpg``, ``.jpeg``, ``.webp``; other
files are skipped and counted) becomes a file entry named by its path relative
to the data root, with its sha256 and size, hashed on threads and recorded in
the stat cache (so the verify that follows, and the first training, hash
nothing again). The dataset part is ``{"format": "images", "root": DIR,
"classes": [...]}``: the class folders in sorted order, or with an ``index``
option the labels the index names. A class folder without an image is an
error naming it (exit 3), as is an image directly in ``DIR`` (folder layout).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import DataIntegrityError, UsageError
from .images import is_image

__all__ = ["Folder", "scan", "file_entries"]


@dataclass(frozen=True)
class Folder:
    root: str                  # DIR relative to the data root (POSIX)
    files: list[tuple[str, Path]]  # (path relative to the data root, the file), path order
    classes: list[str]         # the class folders holding images, sorted
    skipped: int               # files without an image extension


def scan(directory: Path, data_root: Path, *, indexed: bool) -> Folder:
    """The image files under ``directory`` (links are not followed into); with
    ``indexed`` the labels come from an index, so no class folder is required."""
    resolved = directory.resolve()
    if not resolved.is_dir():
        raise UsageError(f"{directory}: expected a directory of images, found none")
    if not resolved.is_relative_to(data_root):
        raise UsageError(f"{directory}: expected a folder inside the data root {data_root} "
                         f"(the manifest's directory), found {resolved}; move it there first")
    found: list[tuple[str, Path]] = []
    skipped, empty = 0, []
    for dirpath, dirnames, filenames in os.walk(resolved):
        dirnames.sort()
        here = Path(dirpath)
        links = [d for d in dirnames if (here / d).is_symlink()]
        if links:  # os.walk does not follow them: their images would be left out, silently
            raise DataIntegrityError(str(here / links[0]), "a folder (class folders and "
                                     "image files only)", "a symbolic link to a folder",
                                     "replace the link with the folder itself; links are not "
                                     "followed, so its images would be left out; nothing was "
                                     "written")
        images = [f for f in sorted(filenames) if is_image(f) and (here / f).is_file()]
        skipped += len(filenames) - len(images)
        if here != resolved and here.parent == resolved and not indexed and not any(
                is_image(f) for _, _, fs in os.walk(here) for f in fs):
            empty.append(here)
        found += [((here / f).relative_to(data_root).as_posix(), here / f) for f in images]
    root = resolved.relative_to(data_root).as_posix() or "."
    if empty:
        raise DataIntegrityError(str(empty[0]), "a class folder holding at least one image "
                                 "(.png, .jpg, .jpeg, .webp)", "none (an empty class folder)",
                                 "add its images or remove the folder; nothing was written")
    if not found:
        raise DataIntegrityError(str(directory), "image files (.png, .jpg, .jpeg, .webp)",
                                 "none", "nothing was written")
    prefix = "" if root == "." else root + "/"
    classes = sorted({p[len(prefix):].split("/")[0] for p, _ in found if "/" in p[len(prefix):]})
    if not indexed:
        loose = [f for p, f in found if "/" not in p[len(prefix):]]
        if loose:
            raise DataIntegrityError(str(loose[0]), f"an image inside a class folder "
                                     f"{directory}/<class>/", "an image directly in the folder",
                                     "move it into its class folder; nothing was written")
    return Folder(root, found, classes, skipped)


def file_entries(folder: Folder, *, source: str, licence: str, description: str,
                 stat_cache_dir: Path | None) -> dict[str, dict[str, Any]]:
    """name -> manifest file entry of every image, hashed on threads."""
    from .manifest import hash_files

    sums = hash_files([f for _, f in folder.files], stat_cache_dir)
    return {p: {"path": p, "sha256": sha, "size": size, "source": source, "licence": licence,
                "description": description} for (p, _), (sha, size) in zip(folder.files, sums)}

