"""Tests for pipeline/data/delimited.py: CSV decoded as it streams (the same
arrays whatever the pieces), a declared header that is really data refused,
an undeclared one pointed out, an endless line refused."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import DataIntegrityError
from pipeline.data import bounded, delimited, formats

SPEC = {"format": "csv", "file": "t", "features": [0, 3], "label": 3, "value_range": [0, 99],
        "classes": 3}


def decode(tmp_path: Path, blob: bytes, **spec: object) -> formats.Decoded:
    (tmp_path / "t").write_bytes(blob)
    return formats.decode({**SPEC, **spec}, {"t": tmp_path / "t"})


def test_header_true_on_a_file_without_one_is_refused(tmp_path: Path) -> None:
    """header = true and a first line that parses as data: its example would be
    dropped silently (exit 0 before); refused naming FILE:1 and the row."""
    text = b"1,2,3,0\n4,5,6,1\n7,8,9,2\n"
    with pytest.raises(DataIntegrityError) as e:
        decode(tmp_path, text, header=True)
    assert str(e.value).startswith(f"{tmp_path / 't'}:1: expected a header line (header = "
                                   "true), found a row that parses as data: '1,2,3,0'")
    assert "set header = false" in str(e.value) and e.value.exit_code == 3
    assert len(decode(tmp_path, text).y) == 3  # control: without header, every row
    assert decode(tmp_path, b"a,b,c,label\n" + text, header=True).y.tolist() == [0, 1, 2]


def test_a_header_not_declared_is_pointed_out(tmp_path: Path) -> None:
    """header = false and a first line of words: the row error says it looks
    like a header; a bad first row of numbers does not."""
    with pytest.raises(DataIntegrityError, match=r"t:1: .*'a'; line 1 looks like a header: "
                                                 r"if it is one, set header = true"):
        decode(tmp_path, b"a,b,c,label\n1,2,3,0\n")
    with pytest.raises(DataIntegrityError) as e:
        decode(tmp_path, b"1,2,300,0\n1,2,3,0\n")
    assert "in 0..99" in str(e.value) and "looks like a header" not in str(e.value)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_pieces_do_not_change_the_arrays_or_line_numbers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Read 1, 2, 3, 7 or 64 bytes at a time (a "\\r\\n" or a row split between
    pieces): the same arrays as one piece, and a bad row keeps its line number."""
    rows = b"".join(b"%d,%d,%d,%d\r\n" % (i % 10, i % 7, i % 5, i % 3) for i in range(40))
    whole = decode(tmp_path, gzip.compress(rows), compression="gzip")
    monkeypatch.setattr(bounded, "CHUNK", chunk)
    got = decode(tmp_path, gzip.compress(rows), compression="gzip")
    assert got.x.tobytes() == whole.x.tobytes() and np.array_equal(got.y, whole.y)
    assert len(got.y) == 40
    with pytest.raises(DataIntegrityError, match=r"t:38: expected column 3 \(label\)"):
        decode(tmp_path, rows.replace(b"\r\n7,2,2,1\r\n", b"\r\n7,2,2,5\r\n"))


def test_an_endless_line_is_refused_not_buffered(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A line longer than MAX_LINE (here 64 bytes) is refused naming its line."""
    monkeypatch.setattr(bounded, "CHUNK", 16)
    monkeypatch.setattr(delimited, "MAX_LINE", 64)
    with pytest.raises(DataIntegrityError, match=r"t:2: expected a row of at most 64 bytes"):
        decode(tmp_path, b"1,2,3,0\n" + b"1" * 200 + b",2,3,0\n")
    assert len(decode(tmp_path, b"1,2,3,0\n" + b"1" * 2 + b",2,3,0\n").y) == 2  # control
