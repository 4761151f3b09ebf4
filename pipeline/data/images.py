"""Image files decoded through Pillow (format ``images``; docs/reference/manifest.md).

A part of format ``images`` reads every manifest file under its ``root`` whose
name ends in ``.png``, ``.jpg``, ``.jpeg`` or ``.webp`` (``members``, in path
order). Its labels come from the class folder (``root/<class>/<file>``), or
from an ``index``: a manifest file, CSV (header ``path,label``) or JSON (a list
of ``{"path", "label"}``), each path relative to ``root``, in the index's
order. ``classes`` names the classes; a label is its position there.

Decoding (fixed, so its bits are Pillow's and nothing else's): the file opens
only as the type its extension names; its header's pixel count must be at most
``max_pixels`` (a decompression bomb is refused before any pixel is decoded);
the pixels as stored (no EXIF rotation) are converted to ``L`` (``channels``
1, ITU-R 601-2 luma) or ``RGB`` (3, alpha dropped) by Pillow's integer
conversion; with ``size`` = [h, w] resized by ``Image.resize`` with
``Resampling.BILINEAR`` (8-bit fixed point, no ``reducing_gap``); then
``x = float32(v) / float32(divisor)`` (default 255) in (C, H, W) order. Which
Pillow and codec libraries decoded is ``decoder_identity()``: part of the
decode-cache key and of a run's ``data`` (so a run depends on the decoded
arrays' hash, ``data_decoded``, and another JPEG decoder is another run).
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import DataIntegrityError

if TYPE_CHECKING:
    import numpy as np

# a manifest file entry (pipeline.data.schema.FileEntry: schema imports this module)
FileEntry = Any

__all__ = ["EXTENSIONS", "MAX_PIXELS", "members", "decoder_identity", "decode", "decode_files",
           "uses_images", "index_rows", "is_image"]

# extension -> the one Pillow format a file so named may be
EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
MAX_PIXELS = 1 << 24  # default ``max_pixels``: 16.7 M pixels (4096 x 4096) per image
MAX_INDEX_BYTES = 64 << 20
_MODES_OK = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La")


def is_image(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in EXTENSIONS


def members(root: str, files: Mapping[str, FileEntry]) -> tuple[str, ...]:
    """The names of the file entries under ``root`` with an image extension, in path order."""
    prefix = "" if root in (".", "") else root.rstrip("/") + "/"
    found = [(e.path, n) for n, e in files.items()
             if e.path.startswith(prefix) and is_image(e.path)]
    return tuple(n for _, n in sorted(found))


def uses_images(specs: Sequence[Mapping[str, Any] | None]) -> bool:
    return any(s is not None and s.get("format") == "images" for s in specs)


def decoder_identity() -> dict[str, Any]:
    """Pillow's version and its codec libraries' (what decides decoded pixels)."""
    import PIL
    from PIL import features

    return {"pillow": PIL.__version__, "jpeg": features.version_codec("jpg"),
            "libjpeg_turbo": features.version_feature("libjpeg_turbo"),
            "zlib": features.version_codec("zlib"), "webp": features.version_module("webp")}


def _rel(path: str, root: str) -> str:
    return path if root in (".", "") else path[len(root.rstrip("/")) + 1:]


def _labels_from_folders(spec: Mapping[str, Any], names: Sequence[str],
                         entries: Mapping[str, FileEntry], paths: Mapping[str, Path]
                         ) -> tuple[list[str], list[int]]:
    classes, root = spec["classes"], spec["root"]
    labels = []
    for n in names:
        rel = _rel(entries[n].path, root)
        cls, sep, _ = rel.partition("/")
        if not sep:
            raise DataIntegrityError(str(paths[n]), f"an image inside a class folder "
                                     f"{root}/<class>/", "an image directly in the root",
                                     "move it into its class folder")
        if cls not in classes:
            raise DataIntegrityError(str(paths[n]), f"a class among {classes}",
                                     f"class folder {cls!r} (a label outside the classes)",
                                     "add the class to the spec's classes, or remove the file")
        labels.append(classes.index(cls))
    return list(names), labels


def index_rows(path: Path) -> list[tuple[str, str, str]]:
    """(path, label, where) of each row of an index file, CSV or JSON."""
    from ..core.safeio import read_regular

    try:
        blob = read_regular(path, MAX_INDEX_BYTES)
    except OSError as e:
        raise DataIntegrityError(str(path), f"a readable index of at most {MAX_INDEX_BYTES} "
                                 "bytes", f"{type(e).__name__}: {e.strerror}") from None
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataIntegrityError(str(path), "a UTF-8 index", f"invalid UTF-8 at byte {e.start}") \
            from None
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise DataIntegrityError(str(path), "a JSON list of {path, label}",
                                     f"invalid JSON ({e})") from None
        if not isinstance(raw, list) or not all(
                isinstance(r, dict) and set(r) == {"path", "label"}
                and all(isinstance(v, str) for v in r.values()) for r in raw):
            raise DataIntegrityError(str(path), 'a JSON list of {"path": str, "label": str}',
                                     "something else")
        return [(r["path"], r["label"], f"{path} [{i}]") for i, r in enumerate(raw)]
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip() for c in rows[0]] != ["path", "label"]:
        raise DataIntegrityError(f"{path}:1", "the CSV header path,label",
                                 repr(",".join(rows[0]) if rows else ""))
    out = []
    for i, r in enumerate(rows[1:], start=2):
        if len(r) != 2:
            raise DataIntegrityError(f"{path}:{i}", "2 fields (path,label)", f"{len(r)}")
        out.append((r[0].strip(), r[1].strip(), f"{path}:{i}"))
    return out


def _labels_from_index(spec: Mapping[str, Any], names: Sequence[str],
                       entries: Mapping[str, FileEntry], paths: Mapping[str, Path]
                       ) -> tuple[list[str], list[int]]:
    classes, root = spec["classes"], spec["root"]
    by_rel = {_rel(entries[n].path, root): n for n in names}
    order, labels, seen = [], [], set()
    for rel, label, where in index_rows(paths[spec["index"]]):
        if rel not in by_rel:
            raise DataIntegrityError(where, f"the path (relative to {root}) of an image file "
                                     "the manifest lists", repr(rel),
                                     "add the file with `pipeline data add`")
        if rel in seen:
            raise DataIntegrityError(where, "each image once", f"{rel!r} again")
        if label not in classes:
            raise DataIntegrityError(where, f"a label among {classes}",
                                     f"{label!r} for {rel} (a label outside the classes)")
        seen.add(rel)
        order.append(by_rel[rel])
        labels.append(classes.index(label))
    return order, labels


def _check_classes(spec: Mapping[str, Any], labels: list[int], data_root: Path,
                   index: Path | None) -> None:
    """Every class has an example: an empty class folder is an error, not a class
    the model can never learn."""
    for i, cls in enumerate(spec["classes"]):
        if i not in labels:
            where = str(index) if index else str(data_root / spec["root"] / cls)
            raise DataIntegrityError(where, f"at least one image of class {cls!r}",
                                     "none (an empty class)",
                                     "add images of the class, or remove it from classes")


def _png_bit_depth(path: Path) -> int:
    """The bit depth a PNG's header declares (IHDR: byte 24 of the file)."""
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if len(head) == 25 else 0


def _one(path: Path, spec: Mapping[str, Any]) -> np.ndarray:
    """One image's pixels, uint8 (C, H, W), as the module docstring specifies."""
    import numpy as np
    from PIL import Image, ImageFile, UnidentifiedImageError

    fmt = EXTENSIONS[path.suffix.lower()]
    limit = spec.get("max_pixels", MAX_PIXELS)
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a process-wide switch some code sets
        raise DataIntegrityError(str(path), "PIL.ImageFile.LOAD_TRUNCATED_IMAGES off",
                                 "it on (truncated images would decode as grey)",
                                 "do not set it in the model's code")
    try:
        with Image.open(path, formats=[fmt]) as im:
            if im.width * im.height > limit:
                raise DataIntegrityError(str(path), f"at most max_pixels={limit} pixels",
                                         f"{im.width}x{im.height} (a decompression bomb?)",
                                         "raise max_pixels in the decode spec if it is real")
            if im.mode not in _MODES_OK:
                raise DataIntegrityError(str(path), f"an 8-bit image (modes {_MODES_OK})",
                                         f"mode {im.mode}")
            if getattr(im, "n_frames", 1) > 1:  # APNG, animated WebP: which frame is the image?
                raise DataIntegrityError(str(path), "a still image (one frame)",
                                         f"{im.n_frames} frames (an animation)")
            if fmt == "PNG" and _png_bit_depth(path) > 8:  # Pillow would cut it to 8 bits
                raise DataIntegrityError(str(path), "an 8-bit image",
                                         f"{_png_bit_depth(path)} bits per sample")
            im.load()
            out = im.convert("L" if spec.get("channels", 3) == 1 else "RGB")
    except DataIntegrityError:
        raise
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            head = f.read(8)
        raise DataIntegrityError(str(path), f"a {fmt} image (its extension)",
                                 f"not a {fmt} file (starts with {head!r})",
                                 "rename it to its type's extension, or remove it") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataIntegrityError(str(path), f"at most max_pixels={limit} pixels",
                                 f"a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise DataIntegrityError(str(path), f"a valid {fmt} image",
                                 f"a corrupt one ({type(e).__name__}: {e})",
                                 "restore or remove the file") from None
    if "size" in spec:
        h, w = spec["size"]
        out = out.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None)
    arr = np.asarray(out, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _pixels(order: Sequence[str], paths: Mapping[str, Path], spec: Mapping[str, Any]
            ) -> np.ndarray:
    """Every image decoded (on threads: Pillow decodes without the GIL), stacked
    (n, C, H, W) uint8; each must have the first's shape."""
    import warnings

    import numpy as np
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            arrays = list(pool.map(lambda n: _one(paths[n], spec), order))
    first = arrays[0].shape
    for n, a in zip(order, arrays):
        if a.shape != first:
            raise DataIntegrityError(str(paths[n]), f"an image of {first[2]}x{first[1]} "
                                     f"pixels, as {paths[order[0]]}", f"{a.shape[2]}x"
                                     f"{a.shape[1]}", 'give the decode spec a "size" to '
                                     "resize every image to")
    return np.ascontiguousarray(np.stack(arrays))  # stack keeps the transposed layout


def decode(spec: Mapping[str, Any], names: Sequence[str], entries: Mapping[str, FileEntry],
           paths: Mapping[str, Path], data_root: Path
           ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], int]:
    """Decode an images part (``names``: its members): (x (n, C, H, W) float32,
    y (n,) int64, input shape, classes)."""
    import numpy as np

    from .mapped import check_finite, to_float32

    if not names:
        raise DataIntegrityError(str(data_root / spec["root"]), "image files (.png, .jpg, "
                                 ".jpeg, .webp) listed in the manifest", "none",
                                 "add them with `pipeline data add DIR`")
    how = _labels_from_index if "index" in spec else _labels_from_folders
    order, labels = how(spec, names, entries, paths)
    _check_classes(spec, labels, data_root, paths[spec["index"]] if "index" in spec else None)
    raw = _pixels(order, paths, spec)
    x = to_float32(raw, spec.get("divisor", 255))
    check_finite(x, str(data_root / spec["root"]))
    return x, np.array(labels, dtype=np.int64), tuple(raw.shape[1:]), len(spec["classes"])


def decode_files(paths: Sequence[Path], spec: Mapping[str, Any]) -> np.ndarray:
    """Image files outside any manifest (``pipeline predict``) decoded as an
    images part with ``spec`` decodes its members: (n, C, H, W) float32, each
    file checked as a member is (type, size, mode, frames), all one shape."""
    from .mapped import check_finite, to_float32

    raw = _pixels([str(p) for p in paths], {str(p): p for p in paths}, spec)
    x = to_float32(raw, spec.get("divisor", 255))
    check_finite(x, str(paths[0]))
    return x
