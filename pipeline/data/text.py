"""Text to tokens, streamed: raw bytes (256 classes) or UTF-8 characters
(the sorted distinct characters are the vocabulary).

The content is read ``CHUNK`` bytes at a time (pipeline.data.bounded, within
the decode's ``Budget``) and each piece kept only as its code points
(uint32; uint8 for bytes), with its distinct values. The int64 tokens are
then written piece by piece, each piece dropped once written: the output's
pages are committed as they are written, so the peak is about the tokens
themselves (8 bytes each) plus one piece, not a multiple of the text.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import numpy as np

from ..core.errors import DataIntegrityError
from .bounded import Content

__all__ = ["tokens"]

_STEP = 1 << 20  # tokens converted at a time (a searchsorted temporary of 8 MiB)


def _utf8_pieces(content: Content) -> Iterator[np.ndarray]:
    """The content's code points (uint32), one array per piece read; strict
    UTF-8 (no surrogates, no overlong forms), an error naming the byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    seen = 0  # bytes of the content before the current piece
    for final, piece in _ends(content.chunks()):
        pending = len(decoder.getstate()[0])  # bytes of a character split across pieces
        try:
            text = decoder.decode(piece, final)
        except UnicodeDecodeError as e:  # e.object is the pending bytes + this piece
            raise DataIntegrityError(content.where, "UTF-8 text",
                                     f"invalid byte 0x{e.object[e.start]:02x} at byte offset "
                                     f"{seen - pending + e.start} ({e.reason})") from e
        seen += len(piece)
        yield np.frombuffer(text.encode("utf-32-le"), "<u4")


def _ends(pieces: Iterator[bytes]) -> Iterator[tuple[bool, bytes]]:
    """(is it the last, piece), with an empty last piece when there is none."""
    last = b""
    for i, piece in enumerate(pieces):
        if i:
            yield False, last
        last = piece
    yield True, last


def _fill(pieces: list[np.ndarray], points: np.ndarray | None) -> np.ndarray:
    """The int64 tokens of ``pieces`` (each the index of its value in the sorted
    ``points``, or the value itself), emptying ``pieces`` as it goes."""
    out = np.empty(sum(len(p) for p in pieces), np.int64)  # (T,) committed as written
    at = 0
    pieces.reverse()
    while pieces:
        piece = pieces.pop()  # the last reference: freed once converted
        for i in range(0, len(piece), _STEP):
            part = piece[i:i + _STEP]
            out[at:at + len(part)] = part if points is None else np.searchsorted(points, part)
            at += len(part)
    return out


def tokens(content: Content, vocabulary: str) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """(tokens (T,) int64, the characters for ``"chars"`` or None for ``"bytes"``)."""
    if vocabulary == "bytes":
        return _fill([np.frombuffer(p, np.uint8) for p in content.chunks()], None), None
    pieces, distinct = [], []
    for codes in _utf8_pieces(content):
        pieces.append(codes)
        distinct.append(np.unique(codes))
    points = np.unique(np.concatenate(distinct)) if distinct else np.zeros(0, np.uint32)
    return _fill(pieces, points), tuple(map(chr, points.tolist()))
