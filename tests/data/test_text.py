"""Tests for pipeline/data/text.py: tokens decoded as the text streams are
the tokens of the whole text, a character split between pieces included,
and an invalid byte is named by its offset in the file."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from pipeline.core.errors import DataIntegrityError
from pipeline.data import bounded, formats

TEXT = "héllo wörld € 𝄞 é, again: héllo\n" * 3


def decode(tmp_path: Path, blob: bytes, vocabulary: str = "chars") -> formats.Decoded:
    (tmp_path / "t").write_bytes(gzip.compress(blob))
    spec = {"format": "text", "file": "t", "vocabulary": vocabulary, "compression": "gzip"}
    return formats.decode(spec, {"t": tmp_path / "t"})


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1 << 20])
def test_pieces_do_not_change_the_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         chunk: int) -> None:
    """Read 1, 2, 3, 5 bytes at a time (multi-byte characters split) or at once:
    the same vocabulary and tokens, for chars and for bytes."""
    monkeypatch.setattr(bounded, "CHUNK", chunk)
    got = decode(tmp_path, TEXT.encode())
    assert got.vocabulary == tuple(sorted(set(TEXT)))
    assert "".join(got.vocabulary[i] for i in got.x) == TEXT
    assert got.x.dtype.name == "int64" and got.n_classes == len(set(TEXT))
    raw = decode(tmp_path, TEXT.encode(), "bytes")
    assert raw.x.tolist() == list(TEXT.encode()) and raw.vocabulary is None


@pytest.mark.parametrize("chunk", [1, 4, 1 << 20])
def test_an_invalid_byte_is_named_by_its_file_offset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Whatever the pieces, the offset is the byte's offset in the content, and
    a character cut short at the end is refused too."""
    monkeypatch.setattr(bounded, "CHUNK", chunk)
    head = "aé€".encode()  # 6 bytes
    with pytest.raises(DataIntegrityError, match=r"invalid byte 0xc3 at byte offset 6 "
                                                 r"\(invalid continuation byte\)"):
        decode(tmp_path, head + b"\xc3(" + b"tail")
    with pytest.raises(DataIntegrityError, match=r"invalid byte 0xe2 at byte offset 6 "
                                                 r"\(unexpected end of data\)"):
        decode(tmp_path, head + "€".encode()[:2])
