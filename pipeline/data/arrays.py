"""npy and IDX arrays: headers parsed within bounds and their shapes checked
(for pipeline.data.mapped, which maps the data), and the arrays read into
memory, npz members and gzip'd IDX files, bounded by what their headers
declare before a byte of data is read.

Nothing here unpickles: an npy header is a literal parsed by NumPy (at most
``MAX_HEADER`` characters, as NumPy's own bound), an object dtype is refused
before its data is read, and npz members are read by ``zipfile`` and this
module, never by ``np.load``. A zip member inflates to at most the size its
entry declares (``zipfile`` stops there), and that size must be exactly the
npy header plus its shape's bytes, so the declaration checked against the
``Budget`` bounds the memory.
"""

from __future__ import annotations

import io
import math
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DataIntegrityError
from .bounded import Budget, Content, open_data

__all__ = ["Header", "IDX_TYPES", "MAX_HEADER", "NO_PICKLE", "npy_header", "idx_header",
           "read_npz", "read_idx"]

MAX_HEADER = 10_000  # characters of an npy header: NumPy's own bound (np.lib.format)
_MAX_READ = 1 << 16  # header bytes read at most: all a 1.0 length can say; 2.0 is refused past it
NO_PICKLE = "a NumPy array without Python objects (pickles are never loaded)"
_MAX_BYTES = 2**63 - 1  # the largest array NumPy can describe (intp)
# IDX type byte -> element type, big-endian (yann.lecun.com/exdb/mnist, "THE IDX FILE FORMAT")
IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_NUMERIC = "biuf"


@dataclass(frozen=True)
class Header:
    """What an npy or IDX header declares: the data starts ``offset`` bytes in."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran: bool
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def layout(self, dims: str = "shape") -> str:
        return f"header {self.offset} + {dims} {self.shape} x {self.dtype.itemsize} bytes"


def _check_shape(shape: tuple[Any, ...], itemsize: int) -> None:
    """ValueError unless every dimension is an int (not a bool) >= 0 and NumPy
    can describe the array (its non-zero dimensions' bytes fit in intp)."""
    for d in shape:
        if type(d) is not int:
            raise ValueError(f"a dimension {d!r} ({type(d).__name__}) in shape {shape}; "
                             "dimensions are integers")
        if d < 0:
            raise ValueError(f"a negative dimension in shape {shape}")
    if math.prod(max(d, 1) for d in shape) * itemsize > _MAX_BYTES:
        raise ValueError(f"shape {shape}, larger than any array (2**63 bytes)")


def npy_header(read: Callable[[int], bytes]) -> Header:
    """The header of npy format 1.0 or 2.0 read through ``read`` (from the
    file's start); ValueError for anything else, an object dtype included."""
    fmt = np.lib.format
    version = fmt.read_magic(io.BytesIO(read(fmt.MAGIC_LEN)))  # ValueError for a pickle, a zip
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"npy format {version[0]}.{version[1]} is not read here "
                         "(1.0 and 2.0 are; 3.0 only adds unicode field names)")
    size = "<H" if version == (1, 0) else "<I"
    raw = read(struct.calcsize(size))
    n = struct.unpack(size, raw)[0] if len(raw) == struct.calcsize(size) else 0
    if n > _MAX_READ:  # before reading it (NumPy reads first, then refuses > MAX_HEADER)
        raise ValueError(f"an npy header of {n} bytes (at most {MAX_HEADER} are parsed)")
    parse = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    try:  # a literal: no code runs
        shape, fortran, dtype = parse(io.BytesIO(raw + read(n)))
    except (tokenize.TokenError, SyntaxError) as e:  # NumPy's Python 2 fallback tokenizes
        raise ValueError(f"an npy header that is not a dict literal ({e})") from None
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    _check_shape(shape, dtype.itemsize)
    return Header(tuple(shape), dtype, fortran, fmt.MAGIC_LEN + len(raw) + n)


def idx_header(read: Callable[[int], bytes], where: str) -> Header:
    """An IDX header read through ``read``: magic (0, 0, type, ndim), then ndim
    big-endian uint32 dims; DataIntegrityError naming ``where`` otherwise."""
    magic = read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in IDX_TYPES or magic[3] == 0:
        raise DataIntegrityError(where, "IDX magic 00 00, a type byte (08 09 0b 0c 0d 0e), "
                                 "ndim >= 1", f"bytes {magic.hex(' ')!r}")
    ndim, dtype = magic[3], IDX_TYPES[magic[2]]
    dims = read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataIntegrityError(where, f"at least {4 + 4 * ndim} bytes (header with {ndim} "
                                 "dims)", f"{4 + len(dims)} bytes (truncated)")
    return Header(struct.unpack(f">{ndim}I", dims), dtype, False, 4 + 4 * ndim)


def _size_error(where: str, head: Header, found: int, dims: str = "shape") -> DataIntegrityError:
    want = head.offset + head.nbytes
    why = "truncated" if found < want else "trailing bytes"
    return DataIntegrityError(where, f"{want} bytes ({head.layout(dims)})",
                              f"{found} bytes ({why})")


def _fill(head: Header, read_into: Callable[[memoryview], int]) -> tuple[np.ndarray, int]:
    """An array of ``head``'s shape filled by ``read_into``; (array, bytes read)."""
    flat = np.empty(math.prod(head.shape), head.dtype)
    got = read_into(memoryview(flat.view(np.uint8)))  # type: ignore[arg-type]  # numpy stubs
    shaped = flat.reshape(head.shape[::-1]).T if head.fortran else flat.reshape(head.shape)
    return shaped, got


def _member(z: zipfile.ZipFile, key: str, where: str, keys: Sequence[str]) -> zipfile.ZipInfo:
    """The entry of array ``key`` (``key.npy`` or ``key``, as np.load finds it)."""
    names = z.namelist()
    name = next((n for n in (f"{key}.npy", key) if n in names), None)
    if name is None:
        raise DataIntegrityError(where, f"an .npz archive holding arrays {list(keys)}",
                                 f"no array {key!r}; arrays "
                                 f"{[n.removesuffix('.npy') for n in names]}")
    info = z.getinfo(name)
    if info.flag_bits & 0x1:  # zip "encrypted" bit: zipfile would ask for a password
        raise DataIntegrityError(f"{where}[{key}]", "an unencrypted member",
                                 f"member {name!r} is encrypted")
    return info


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, at: str, budget: Budget
                 ) -> np.ndarray:
    with z.open(info) as m:  # inflates at most info.file_size bytes
        try:
            head = npy_header(m.read)
        except (ValueError, EOFError) as e:
            raise DataIntegrityError(at, NO_PICKLE, f"{type(e).__name__}: {e}") from e
        if head.dtype.kind not in _NUMERIC:
            raise DataIntegrityError(at, "a numeric (bool/int/uint/float) array",
                                     f"dtype {head.dtype}, shape {head.shape}")
        if info.file_size != head.offset + head.nbytes:
            raise _size_error(at, head, info.file_size)
        budget.take(head.nbytes, at, f"{head.nbytes} bytes ({head.layout()}), declared")

        def read_into(view: memoryview) -> int:
            done = 0
            # ZipExtFile is a BufferedIOBase (readinto), typed as IO[bytes]
            while done < len(view) and (n := m.readinto(  # type: ignore[attr-defined]
                    view[done:done + (1 << 20)])):
                done += n
            return done

        data, got = _fill(head, read_into)
    if got != head.nbytes:
        raise _size_error(at, head, head.offset + got)
    return data


def read_npz(path: Path, keys: Sequence[str], budget: Budget) -> list[np.ndarray]:
    """Arrays ``keys`` of the .npz archive at ``path``, in order, each checked
    (unencrypted, numeric, exact size) and counted against ``budget`` before
    its data is read. DataIntegrityError names the file and the array."""
    where = str(path)
    with open_data(path) as f:
        try:
            with zipfile.ZipFile(f) as z:
                infos = [_member(z, k, where, keys) for k in keys]
                return [_read_member(z, i, f"{where}[{k}]", budget)
                        for k, i in zip(keys, infos)]
        except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError, zlib.error,
                ValueError) as e:  # a corrupt archive; not ours (DataIntegrityError passes)
            if isinstance(e, DataIntegrityError):
                raise
            raise DataIntegrityError(where, f"an .npz archive holding arrays {list(keys)}",
                                     f"{type(e).__name__}: {e}") from e


def read_idx(path: Path, compression: str, budget: Budget) -> np.ndarray:
    """An IDX file read into memory (gunzipped when ``compression`` is "gzip"):
    its dims are checked against ``budget`` before the data is read, and the
    content must end exactly where they say."""
    where = str(path)
    with Content(path, compression, budget) as c:
        head = idx_header(c.read, where)
        budget.need(head.nbytes, where, f"{head.nbytes} bytes ({head.layout('dims')}), declared")
        data, got = _fill(head, c.fill)
        if got < head.nbytes:
            raise _size_error(where, head, head.offset + got, "dims")
        if not c.at_end():
            raise DataIntegrityError(where, f"{head.offset + head.nbytes} bytes "
                                     f"({head.layout('dims')})",
                                     "more bytes (trailing bytes)")
    if not head.dtype.isnative:  # big-endian on this machine: swapped in place, no copy
        data = data.byteswap(inplace=True).view(head.dtype.newbyteorder("="))
    return data
