"""A data file's content read into memory within a bound, never past it.

Every decoder that reads a file into memory (csv, text, npz, gzip'd IDX)
reads through here. ``Budget`` is the most bytes of content a decode may
hold: the decode spec's ``max_bytes``, else ``DEFAULT_MAX_BYTES``. Content is
counted after decompression, so a gzip bomb (a small file that inflates to
gigabytes, which nothing declares) stops at the bound: a gzip'd file is
inflated at most ``min(asked, left + 1)`` bytes per read (``gzip`` passes
that as zlib's ``max_length``), and one byte past the bound is refused. A
format that declares its size (an npy or IDX header, a zip member's entry)
is refused from the declaration, before anything is read
(pipeline.data.arrays). A plain file is refused from its size.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

from ..core.errors import DataIntegrityError
from ..core.safeio import describe, open_regular

__all__ = ["DEFAULT_MAX_BYTES", "CHUNK", "Budget", "Content", "open_data", "max_bytes"]

# Content per decode spec, after decompression (docs/reference/manifest.md): decoded,
# at most 2 GiB (text's int64 tokens); a gzip or zip bomb stops here.
DEFAULT_MAX_BYTES = 256 << 20
CHUNK = 16 << 20  # bytes per read of a streamed decode (csv, text)
_RAISE = ("if the data really is this large, raise the bound: set \"max_bytes\" in its decode "
          "spec (pipeline data add ... --decode max_bytes=N); decoded, it takes 4 bytes per "
          "value (csv, npz, idx) or 8 per token (text) in memory")


def max_bytes(spec: Mapping[str, Any]) -> int:
    """The bound of a (valid) decode spec: its ``max_bytes`` or the default."""
    return int(spec.get("max_bytes", DEFAULT_MAX_BYTES))


class Budget:
    """The bytes of content one decode may still read into memory."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    @property
    def left(self) -> int:
        return self.limit - self.used

    def need(self, n: int, where: str, what: str = "") -> None:
        """DataIntegrityError naming ``where`` if ``n`` more bytes (read, or
        declared: ``what`` says by whom) would pass the bound."""
        if n > self.left:
            found = what or f"more than {self.limit} bytes (the rest was not read)"
            raise DataIntegrityError(where, f"at most {self.limit} bytes of content "
                                     f"(max_bytes, after decompression)", found, _RAISE)

    def take(self, n: int, where: str, what: str = "") -> None:
        """Count ``n`` bytes read into memory (``need`` first)."""
        self.need(n, where, what)
        self.used += n


def open_data(path: Path) -> BinaryIO:
    """``path`` opened as a regular file (no FIFO, no device), or DataIntegrityError."""
    try:
        return open_regular(path)
    except OSError as e:  # missing, a FIFO or device, unreadable
        raise DataIntegrityError(str(path), "a readable regular file", describe(e)) from e


class Content:
    """The content of the file at ``path``, gunzipped when ``compression`` is
    "gzip", read in pieces that ``budget`` counts (a context manager).

    Its size is checked before anything is kept: a plain file's from fstat; a
    gzip'd one's, with ``measure`` (its decoder keeps more than the bytes it
    reads: text and csv), by inflating it once and keeping nothing, so a bomb
    costs one piece of memory, never a multiple of the bound."""

    def __init__(self, path: Path, compression: str, budget: Budget, *,
                 measure: bool = False) -> None:
        self.where, self.budget = str(path), budget
        self.gzip = compression == "gzip"
        self._raw = open_data(path)
        self._f: BinaryIO = self._raw
        try:
            if not self.gzip:  # a plain file declares its size: refused before a byte is read
                size = os.fstat(self._raw.fileno()).st_size
                budget.need(size, self.where, f"a file of {size} bytes")
            elif measure:
                before, self._f = budget.used, self._gunzip()
                while self.read(1 << 20):  # counted against the budget, then dropped
                    pass
                self._f.close()
                self._raw.seek(0)
                budget.used = before  # only the decode's own read counts
            if self.gzip:
                self._f = self._gunzip()
        except BaseException:
            self.close()
            raise

    def _gunzip(self) -> BinaryIO:
        return gzip.GzipFile(fileobj=self._raw, mode="rb")  # type: ignore[return-value]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._f is not self._raw:
            self._f.close()
        self._raw.close()

    def read(self, n: int) -> bytes:
        """At most ``n`` bytes (fewer only at the end), counted; never more than
        one byte past the budget is inflated."""
        want = min(n, self.budget.left + 1)
        pieces, got = [], 0
        while got < want and (piece := self._read(want - got)):
            pieces.append(piece)
            got += len(piece)
        self.budget.take(got, self.where)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)  # one piece: no copy

    def at_end(self) -> bool:
        """Whether the content has ended (one more byte is read, not counted)."""
        return self._read(1) == b""

    def _read(self, n: int) -> bytes:
        try:
            return self._f.read(n)  # gzip: inflates at most n bytes (zlib's max_length)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            if not self.gzip:
                raise
            raise DataIntegrityError(self.where, "gzip data", f"{type(e).__name__}: {e}") from e

    def chunks(self) -> Iterator[bytes]:
        """The rest of the content, ``CHUNK`` bytes at a time."""
        while piece := self.read(CHUNK):
            yield piece

    def fill(self, view: memoryview) -> int:
        """Read into ``view`` (bytes) until it is full or the content ends; the count."""
        done = 0
        while done < len(view) and (piece := self.read(min(len(view) - done, 1 << 20))):
            view[done:done + len(piece)] = piece
            done += len(piece)
        return done
