"""Memory-mapped npy and IDX files, and the rows a training step reads from them.

An uncompressed ``.npy`` or IDX file is never read into memory as a whole.
Its header is checked (magic, version, dtype, shape) and so is the file's
size, exactly: header + shape x item size, no byte short or over. The data
is then mapped read-only (``np.memmap``, mode "r") from a descriptor the
caller opened, and a step gathers just its rows, converted the one way the
in-memory decode converts every row (``to_float32``: float32(value) /
float32(divisor), one correctly rounded IEEE division per element), so a
batch has the same bits whichever path made it.

Time of check, time of use: the caller (pipeline.data.dataset) opens each file
right after verification and checks with fstat that it is the file verify
saw (device, inode, size, mtime_ns, ctime_ns); that descriptor is mapped,
and after every gather (``Rows.take``) fstat of the mapping's descriptor
must still match, else the rows are refused (DataIntegrityError, exit 3)
before a step uses them. A write to the file changes its mtime and ctime;
what stat cannot see is a rewrite within the timestamp tick of the last
change before verification (git's "racy clean" case). A file truncated
while mapped makes the kernel raise SIGBUS on the next read of a page past
its new end: the process dies without writing anything half-done, and the
next run stops at verification.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import numpy as np

from ..core.errors import DataIntegrityError
from .arrays import NO_PICKLE, Header, idx_header, npy_header

__all__ = ["map_npy", "map_idx", "Rows", "to_float32", "check_finite", "CHUNK_BYTES"]

CHUNK_BYTES = 16 << 20  # float32 bytes per chunk of a whole-dataset pass (hash, checks)
# A read fault on a file mapping maps up to this much around it (Linux's
# fault_around_bytes, default 64 KiB), so gathering scattered rows can make most
# of a file resident in RSS; once reads may have mapped RELEASE_BYTES, a part
# unmaps its pages (they stay in the page cache).
FAULT_AROUND = 64 << 10
RELEASE_BYTES = 64 << 20


def to_float32(raw: np.ndarray, divisor: float) -> np.ndarray:
    """float32(raw) / float32(divisor), elementwise: the decode's one conversion."""
    with np.errstate(over="ignore"):  # overflow to inf is what check_finite reports
        return np.asarray(raw, dtype=np.float32) / np.float32(divisor)


def check_finite(x: np.ndarray, where: str, first: int = 0) -> None:
    """DataIntegrityError naming the first example (counted from ``first``) of
    ``x`` (rows, ...) holding a value that is not finite."""
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite.all():
        raise DataIntegrityError(where, "finite float32 values after dividing by the divisor",
                                 f"a non-finite value in example {first + int(np.argmin(finite))}")


def _stat(f: BinaryIO) -> tuple[int, ...]:
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _map(f: BinaryIO, where: str, head: Header, dims: str = "shape") -> np.memmap:
    """The data after the header, mapped read-only, once the file's size is
    exactly what the header promises."""
    size = os.fstat(f.fileno()).st_size
    if size != head.offset + head.nbytes:
        why = "truncated" if size < head.offset + head.nbytes else "trailing bytes"
        raise DataIntegrityError(where, f"{head.offset + head.nbytes} bytes "
                                 f"({head.layout(dims)})", f"{size} bytes ({why})")
    return np.memmap(f, dtype=head.dtype, mode="r", offset=head.offset, shape=head.shape,
                     order="F" if head.fortran else "C")


def map_npy(f: BinaryIO, where: str) -> np.memmap:
    """A .npy file (format 1.0 or 2.0) mapped read-only; never unpickles. Its
    shape must be integers (no bools) NumPy can describe (pipeline.data.arrays)."""
    try:
        f.seek(0)
        head = npy_header(f.read)  # a literal of bounded length: no code runs
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise DataIntegrityError(where, NO_PICKLE, f"{type(e).__name__}: {e}") from e
    return _map(f, where, head)


def map_idx(f: BinaryIO, where: str) -> np.memmap:
    """An uncompressed IDX file: magic (0, 0, type, ndim), ndim big-endian uint32
    dims, then the data, mapped read-only in its big-endian type."""
    f.seek(0)
    return _map(f, where, idx_header(f.read, where), dims="dims")


class _Part:
    """One part's rows: a mapped array in the file's dtype and byte order (and
    its divisor), or float32 rows decoded into memory (``divisor`` None)."""

    def __init__(self, raw: np.ndarray, divisor: float | None, where: str,
                 f: BinaryIO | None) -> None:
        self.raw, self.divisor, self.where = raw, divisor, where
        # Our own descriptor (the caller closes theirs): fstat'ed after every gather.
        self.file = os.fdopen(os.dup(f.fileno()), "rb", buffering=0) if f else None
        self.stat = _stat(f) if f else None
        self.row_bytes = raw.dtype.itemsize * math.prod(raw.shape[1:])
        self.mapped = 0  # bytes reads may have mapped into this process since the last release

    def rows(self, ids: np.ndarray | slice) -> np.ndarray:
        if self.divisor is None:
            return self.raw[ids]
        out = to_float32(self.raw[ids], self.divisor)  # reads just these rows' pages
        self.check_unchanged()
        n = len(out)
        self.mapped += n * self.row_bytes + (1 if isinstance(ids, slice) else n) * FAULT_AROUND
        if self.mapped > RELEASE_BYTES:
            self.release()
        return out

    def release(self) -> None:
        """Unmap every page of the file from this process (MADV_DONTNEED on a
        read-only file mapping drops no data: the page cache keeps it), so
        that RSS stays near RELEASE_BYTES however much of the file is read."""
        mm = getattr(self.raw, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED)
        self.mapped = 0

    def check_unchanged(self) -> None:
        if self.file is not None and (now := _stat(self.file)) != self.stat:
            raise DataIntegrityError(self.where, f"the file verified (device, inode, size, "
                                     f"mtime_ns, ctime_ns {self.stat})", f"{now}",
                                     "the file changed while being read; restore it and run "
                                     "again (verification will check it)")


class Rows:
    """A dataset's inputs (n, *shape) float32, read part by part (train part
    first) from maps: ``take`` gathers a batch, ``chunks`` walks every row
    in order (the decoded hash and the value checks), ``materialise`` is the
    whole array in memory (what the in-memory path holds)."""

    dtype = np.dtype(np.float32)

    def __init__(self, parts: Sequence[_Part]) -> None:
        self.parts = list(parts)
        self.ends = np.cumsum([len(p.raw) for p in self.parts])
        self.shape = (int(self.ends[-1]), *self.parts[0].raw.shape[1:])

    @classmethod
    def mapped(cls, raw: np.memmap, divisor: float, where: str, f: BinaryIO) -> Rows:
        """The rows of ``raw``, mapped from ``f`` (whose fstat is recorded now)."""
        return cls([_Part(raw, divisor, where, f)])

    @classmethod
    def stack(cls, xs: Sequence[np.ndarray | Rows]) -> Rows:
        """Parts in order; an in-memory part is float32 rows already converted."""
        return cls([p for x in xs for p in (x.parts if isinstance(x, Rows)
                                            else [_Part(x, None, "", None)])])

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (B,) as float32 (B, *shape), converted as the in-memory decode does."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.parts) == 1:
            return self.parts[0].rows(ids)
        out = np.empty((len(ids), *self.shape[1:]), np.float32)
        which = np.searchsorted(self.ends, ids, side="right")  # the part each id is in
        for k, part in enumerate(self.parts):
            if len(sel := np.flatnonzero(which == k)):
                out[sel] = part.rows(ids[sel] - (self.ends[k] - len(part.raw)))
        return out

    def chunks(self, check: bool = True) -> Iterator[np.ndarray]:
        """Every row in order, converted, ``CHUNK_BYTES`` of float32 at a time
        (C order); ``check``: each mapped chunk's values must be finite."""
        step = max(1, CHUNK_BYTES // max(1, 4 * math.prod(self.shape[1:])))
        for part in self.parts:
            for i in range(0, len(part.raw), step):
                rows = part.rows(slice(i, i + step))
                if check and part.divisor is not None:
                    check_finite(rows, part.where, i)  # example i of its own file
                yield np.ascontiguousarray(rows)

    def materialise(self) -> np.ndarray:
        """All rows in memory: (n, *shape) float32."""
        return np.concatenate(list(self.chunks()))
