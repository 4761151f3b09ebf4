"""Tests for pipeline/formats.py: decode specs, decoders, and their refusals."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.core.errors import ConfigError, DataIntegrityError
from pipeline.data import dataset, formats, manifest
from pipeline.data.mapped import Rows

from ..support import ROOT

DIGITS_SPEC = {"format": "csv", "file": "digits", "compression": "gzip", "features": [0, 64],
               "label": 64, "shape": [1, 8, 8], "value_range": [0, 16], "divisor": 16,
               "classes": 10, "rows": 1797}
SMALL_CSV = {"format": "csv", "file": "t", "features": [0, 3], "label": 3,
             "value_range": [0, 9], "classes": 3}


def _decode(spec: dict[str, Any], tmp_path: Path, **files: bytes) -> formats.Decoded:
    """Write each named file under tmp_path and decode ``spec`` from them; mapped
    inputs are read in full (their values are checked when their rows are read),
    so x is always the in-memory array."""
    paths = {}
    for name, blob in files.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(blob)
    assert formats.files_of(spec) == list(files)
    got = formats.decode(spec, paths)
    if isinstance(got.x, Rows):
        assert formats.maps(spec)
        return dataclasses.replace(got, x=got.x.materialise())
    return got


def _idx(a: np.ndarray, type_byte: int) -> bytes:
    """An IDX file (yann.lecun.com/exdb/mnist) of ``a``, written with struct."""
    head = struct.pack(f">2xBB{a.ndim}I", type_byte, a.ndim, *a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


# --- csv ---------------------------------------------------------------------------

def test_digits_bit_identical_to_the_dataset_decoder(tmp_path: Path) -> None:
    """The shipped digits file decodes to the very bytes pipeline.data.dataset decodes."""
    v = manifest.verify(ROOT / "data-manifest.json")
    d = dataset.load(v, "digits", tmp_path / "cache")
    got = formats.decode(DIGITS_SPEC, {"digits": ROOT / "data" / "digits.csv.gz"})
    assert got.x.shape == (1797, 1, 8, 8) and got.x.dtype == np.float32
    assert got.x.tobytes() == d.x.reshape(-1, 1, 8, 8).tobytes()
    assert got.y.dtype == np.int64 and np.array_equal(got.y, d.y)
    assert (got.input_shape, got.n_classes, got.vocabulary) == ((1, 8, 8), 10, None)


def test_csv_decimals_header_shape_and_divisor(tmp_path: Path) -> None:
    """Header skipped; decimals become f32(value) / f32(divisor), reshaped; labels int64."""
    spec = {"format": "csv", "file": "t", "header": True, "features": [1, 5], "label": 0,
            "shape": [2, 2], "divisor": 3, "classes": 2, "rows": 2}
    got = _decode(spec, tmp_path, t=b"y,a,b,c,d\n1,0.1,-2.5e1,7,.5\r\n0,1,2,3,4\n")
    want = np.array([[0.1, -25, 7, 0.5], [1, 2, 3, 4]]).astype(np.float32) / np.float32(3)
    assert got.x.tobytes() == want.reshape(2, 2, 2).tobytes()
    assert got.y.tolist() == [1, 0] and got.y.dtype == np.int64 and got.input_shape == (2, 2)


def test_csv_gzip_ignores_unused_columns(tmp_path: Path) -> None:
    """A gzip'd csv decodes; a column that is neither feature nor label is not read."""
    spec = {**SMALL_CSV, "compression": "gzip", "features": [1, 3], "label": 4}
    got = _decode(spec, tmp_path, t=gzip.compress(b"id-a,1,2,zz,2\nid-b,3,4,,0\n"))
    assert got.x.tolist() == [[1, 2], [3, 4]] and got.y.tolist() == [2, 0]


@pytest.mark.parametrize(("text", "where", "fragment"), [
    (b"1,2,3,0\n1,2,0\n", ":2", "4 comma-separated fields"),
    (b"1,2,3,0\n1,x,3,0\n", ":2", "column 1 (feature): an integer"),
    (b"1,2,3,0\n1,2.5,3,0\n", ":2", "'2.5'"),
    (b"1,2,3,0\n4,5,6,1\n1,2,10,0\n", ":3", "column 2 (feature): in 0..9"),
    (b"1,2,3,0\n1,2,3,3\n", ":2", "column 3 (label): in 0..2"),
    (b"1,2,3,0\n1,2,3,-1\n", ":2", "'-1'"),
    (b"1,2,3,0\n1,2,\xe9,0\n", ":2", "column 2 (feature)"),
])
def test_csv_bad_row_names_line_column_and_value(tmp_path: Path, text: bytes, where: str,
                                                 fragment: str) -> None:
    """A bad row is reported as PATH:LINE with the column and the value found."""
    with pytest.raises(DataIntegrityError) as e:
        _decode(SMALL_CSV, tmp_path, t=text)
    assert f"{tmp_path / 't'}{where}:" in str(e.value) and fragment in str(e.value)


def test_csv_header_only_read_when_declared(tmp_path: Path) -> None:
    """A header line is a bad row 1 unless header is true; then lines count from 2."""
    text = b"a,b,c,label\n1,2,3,0\n1,2,3,9\n"
    with pytest.raises(DataIntegrityError, match=r"t:1: .*column 0 \(feature\).*'a'"):
        _decode(SMALL_CSV, tmp_path, t=text)
    with pytest.raises(DataIntegrityError, match=r"t:3: .*label"):
        _decode({**SMALL_CSV, "header": True}, tmp_path, t=text)
    got = _decode({**SMALL_CSV, "header": True}, tmp_path, t=text[:-8])
    assert got.x.tolist() == [[1, 2, 3]]


@pytest.mark.parametrize(("spec_rows", "text", "fragment"), [
    (3, b"1,2,3,0\n1,2,3,1\n", "expected 3 data rows, found 2"),
    (None, b"", "expected at least 1 data rows, found 0"),
])
def test_csv_row_count_checked(tmp_path: Path, spec_rows: int | None, text: bytes,
                               fragment: str) -> None:
    """The row count must match ``rows``, and a file needs at least one row."""
    spec = SMALL_CSV if spec_rows is None else {**SMALL_CSV, "rows": spec_rows}
    with pytest.raises(DataIntegrityError, match=fragment):
        _decode(spec, tmp_path, t=text)


def test_csv_overflow_to_inf_refused(tmp_path: Path) -> None:
    """A decimal that is not finite in float32 after the division is a bad row."""
    spec = {**SMALL_CSV, "features": [0, 3]}
    del spec["value_range"]
    with pytest.raises(DataIntegrityError, match=r"t:1: .*finite.*'1e39'"):
        _decode(spec, tmp_path, t=b"1e39,0,0,0\n")


def test_csv_bad_gzip_refused(tmp_path: Path) -> None:
    """A file that is not gzip data under compression "gzip" is refused, naming it."""
    with pytest.raises(DataIntegrityError, match=r"t: expected gzip data"):
        _decode({**SMALL_CSV, "compression": "gzip"}, tmp_path, t=b"1,2,3,0\n")


# --- npy, npz --------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


NPY = {"format": "npy", "x": "x", "y": "y", "divisor": 2, "classes": 3}
NPZ = {"format": "npz", "file": "d", "x": "images", "y": "labels", "classes": 3}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=a.dtype.hasobject)
    return buf.getvalue()


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=True, **arrays)
    return buf.getvalue()


def test_npy_decodes_through_a_memmap(tmp_path: Path) -> None:
    """npy x (uint8, Fortran order) stays a read-only map whose rows read as
    f32 / divisor; y is read into memory as int64."""
    x = np.asfortranarray(np.arange(12, dtype=np.uint8).reshape(3, 2, 2))
    (tmp_path / "x").write_bytes(_npy(x))
    (tmp_path / "y").write_bytes(_npy(np.array([2, 0, 1], np.int16)))
    got = formats.decode(NPY, {"x": tmp_path / "x", "y": tmp_path / "y"})
    assert isinstance(got.x, Rows) and len(got.x) == 3 and got.x.shape == (3, 2, 2)
    raw = got.x.parts[0].raw
    assert isinstance(raw, np.memmap) and not raw.flags.writeable
    want = x.astype(np.float32) / np.float32(2)
    assert got.x.materialise().tobytes() == want.tobytes()
    assert got.x.take(np.array([2, 0])).tobytes() == want[[2, 0]].tobytes()
    assert type(got.y) is np.ndarray and got.y.dtype == np.int64 and got.y.tolist() == [2, 0, 1]
    assert (got.input_shape, got.n_classes) == ((2, 2), 3)


def test_npy_object_dtype_refused_and_never_unpickled(tmp_path: Path) -> None:
    """An object array (or a bare pickle) is refused, and its payload never runs."""
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))  # the payload does work when unpickled
    assert control.exists()
    marker = tmp_path / "marker"
    evil = np.array([_Payload(marker), 1], dtype=object)
    y = _npy(np.array([0, 1]))
    for x in (_npy(evil), pickle.dumps(evil)):
        with pytest.raises(DataIntegrityError, match=r"x: expected a NumPy array without"):
            _decode(NPY, tmp_path, x=x, y=y)
    with pytest.raises(DataIntegrityError, match=r"d\[images\]: expected a NumPy array without"):
        _decode(NPZ, tmp_path, d=_npz(images=evil, labels=np.array([0, 1])))
    assert not marker.exists()


@pytest.mark.parametrize(("x", "y", "fragment"), [
    (np.zeros((3, 2)), np.array([0, 1]), "y: expected 3 labels"),
    (np.zeros((2, 2)), np.array([0, 3]), "y: expected labels in 0..2, found 3 at index 1"),
    (np.zeros((2, 2)), np.array([0.0, 1.0]), "y: expected a 1-D integer array"),
    (np.array([[1.0, np.nan]]), np.array([0]), "x: expected finite float32"),
    (np.array([1 + 2j]), np.array([0]), "x: expected a numeric"),
])
def test_npy_inconsistent_arrays_refused(tmp_path: Path, x: np.ndarray, y: np.ndarray,
                                         fragment: str) -> None:
    """Length mismatch, labels out of range, float labels, NaN, complex x: each refused."""
    with pytest.raises(DataIntegrityError, match=fragment):
        _decode(NPY, tmp_path, x=_npy(x), y=_npy(y))


def _npy_header(header: str, version: bytes = b"\x01\x00", length: int | None = None) -> bytes:
    """An .npy preamble with a header text of our own (np.save would refuse these)."""
    body = (header + " " * (-(len(header) + 11) % 64) + "\n").encode("latin-1")
    n = len(body) if length is None else length
    return b"\x93NUMPY" + version + (struct.pack("<H", n) if version[0] == 1
                                      else struct.pack("<I", n)) + body


_GOOD = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }"


@pytest.mark.parametrize(("blob", "fragment"), [
    (_npy(np.zeros((2, 2), np.float32))[:-1], "x: expected 144 bytes (header 128 + shape "
                                              "(2, 2) x 4 bytes), found 143 bytes (truncated)"),
    (_npy(np.zeros((2, 2), np.float32)) + b"\0", "found 145 bytes (trailing bytes)"),
    (_npy_header(_GOOD.replace("(2, 2)", "(10**12, 2)")), "malformed node"),
    (_npy_header(_GOOD.replace("(2, 2)", "(1000000000000, 2)")) + bytes(16),
     "expected 8000000000128 bytes"),
    (_npy_header(_GOOD.replace("(2, 2)", "(-1, 2)")) + bytes(16), "a negative dimension"),
    (_npy_header(_GOOD, length=60000) + bytes(16), "EOF: reading array header"),
    (_npy_header(_GOOD, version=b"\x03\x00") + bytes(16), "npy format 3.0 is not read"),
    (_npy_header("__import__('os').getcwd()") + bytes(16), "malformed node"),
    (_npy_header(_GOOD.replace("<f4", "O")) + bytes(16), "Object arrays cannot be loaded"),
    (_npz(x=np.zeros(2)), "the magic string is not correct"),
    (b"\x93NUM", "EOF: reading magic string"),
])
def test_npy_hostile_headers_refused(tmp_path: Path, blob: bytes, fragment: str) -> None:
    """A truncated or oversized file, an absurd, negative, overlong, unknown-version,
    code-bearing or object header, an npz: each refused naming the file (exit 3),
    before anything is mapped past the file's end."""
    with pytest.raises(DataIntegrityError) as e:
        _decode(NPY, tmp_path, x=blob, y=_npy(np.array([0, 1])))
    assert str(e.value).startswith(f"{tmp_path / 'x'}: expected") and fragment in str(e.value)
    assert e.value.exit_code == 3


def test_npy_header_control_decodes(tmp_path: Path) -> None:
    """Control for the hostile headers: the hand-made preamble with a good header
    and its 16 data bytes decodes."""
    got = _decode(NPY, tmp_path, x=_npy_header(_GOOD) + np.ones(4, "<f4").tobytes(),
                  y=_npy(np.array([0, 1])))
    assert got.x.tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_npz_decodes_and_names_a_missing_key(tmp_path: Path) -> None:
    """npz arrays decode by key; a missing key is named with the keys found."""
    x, y = np.arange(8, dtype=np.float32).reshape(2, 4), np.array([1, 2], np.uint8)
    got = _decode(NPZ, tmp_path, d=_npz(images=x, labels=y))
    assert got.x.tobytes() == x.tobytes() and got.y.tolist() == [1, 2]
    with pytest.raises(DataIntegrityError, match=r"no array 'labels'; arrays \['images', 'y'\]"):
        _decode(NPZ, tmp_path, d=_npz(images=x, y=y))


# --- idx ---------------------------------------------------------------------------------

IDX = {"format": "idx", "x": "images", "y": "labels", "divisor": 255, "classes": 10}


@pytest.mark.parametrize(("dtype", "type_byte", "compression"), [
    (np.uint8, 0x08, "none"), (np.uint8, 0x08, "gzip"), (np.int16, 0x0B, "none"),
    (np.float32, 0x0D, "none"), (np.float64, 0x0E, "gzip"),
])
def test_idx_decodes(tmp_path: Path, dtype: type, type_byte: int, compression: str) -> None:
    """A real IDX pair (big-endian, plain or gzip'd) decodes to f32(x) / divisor."""
    x = np.arange(24).reshape(2, 3, 4).astype(dtype)
    files = {"images": _idx(x, type_byte), "labels": _idx(np.array([7, 3], np.uint8), 0x08)}
    if compression == "gzip":
        files = {k: gzip.compress(v) for k, v in files.items()}
    got = _decode({**IDX, "compression": compression}, tmp_path, **files)
    assert got.x.tobytes() == (x.astype(np.float32) / np.float32(255)).tobytes()
    assert got.y.tolist() == [7, 3] and got.input_shape == (3, 4)
    assert formats.maps({**IDX, "compression": compression}) == (compression == "none")


@pytest.mark.parametrize(("mangle", "fragment"), [
    (lambda b: b[:-1], "expected 28 bytes (header 16 + dims (2, 3, 2) x 1 bytes), found 27 "
                       "bytes (truncated)"),
    (lambda b: b + b"\0", "found 29 bytes (trailing bytes)"),
    (lambda b: b"\x01" + b[1:], "expected IDX magic 00 00"),
    (lambda b: b[:2] + b"\x07" + b[3:], "found bytes '00 00 07 03'"),
    (lambda b: b[:10], "found 10 bytes (truncated)"),
])
def test_idx_bad_files_refused(tmp_path: Path, mangle: Any, fragment: str) -> None:
    """Truncated, oversized, wrong-magic or unknown-type IDX files are refused."""
    x = _idx(np.zeros((2, 3, 2), np.uint8), 0x08)
    with pytest.raises(DataIntegrityError, match=r"images: ") as e:
        _decode(IDX, tmp_path, images=mangle(x), labels=_idx(np.array([1, 2], np.uint8), 8))
    assert fragment in str(e.value)


# --- text --------------------------------------------------------------------------------

def test_text_chars_vocabulary_and_tokens(tmp_path: Path) -> None:
    """UTF-8 characters (multi-byte too) map to indexes of the sorted distinct characters."""
    text = "héllo wörld € 𝄞 é"
    spec = {"format": "text", "file": "t", "vocabulary": "chars", "compression": "gzip"}
    got = _decode(spec, tmp_path, t=gzip.compress(text.encode()))
    assert got.vocabulary == tuple(sorted(set(text))) and got.n_classes == len(set(text))
    assert got.x.dtype == np.int64 and "".join(got.vocabulary[i] for i in got.x) == text
    assert (got.y, got.input_shape) == (None, ())


def test_text_bytes_are_tokens(tmp_path: Path) -> None:
    """"bytes": each raw byte is a token, 256 classes, no vocabulary."""
    blob = "aé\n".encode() + b"\xff"
    got = _decode({"format": "text", "file": "t", "vocabulary": "bytes"}, tmp_path, t=blob)
    assert got.x.tolist() == list(blob) and got.x.dtype == np.int64
    assert (got.n_classes, got.vocabulary) == (256, None)


@pytest.mark.parametrize(("vocabulary", "blob", "fragment"), [
    ("chars", b"ab\xc3(cd", "expected UTF-8 text, found invalid byte 0xc3 at byte offset 2"),
    ("chars", b"\xed\xa0\x80ab", "at byte offset 0"),
    ("chars", "é".encode(), "expected at least 2 tokens, found 1"),
    ("bytes", b"", "expected at least 2 tokens, found 0"),
])
def test_text_bad_files_refused(tmp_path: Path, vocabulary: str, blob: bytes,
                                fragment: str) -> None:
    """Invalid UTF-8 names the byte offset; fewer than 2 tokens is refused."""
    with pytest.raises(DataIntegrityError) as e:
        _decode({"format": "text", "file": "t", "vocabulary": vocabulary}, tmp_path, t=blob)
    assert str(e.value).startswith(f"{tmp_path / 't'}: ") and fragment in str(e.value)


# --- spec_problems ------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "key", "fragment"), [
    ({**DIGITS_SPEC, "colour": 1}, "d.colour", "unknown key"),
    ({k: v for k, v in DIGITS_SPEC.items() if k != "classes"}, "d.classes", "missing"),
    ({**DIGITS_SPEC, "classes": True}, "d.classes", "true (bool)"),
    ({**DIGITS_SPEC, "header": 1}, "d.header", "1 (int)"),
    ({**DIGITS_SPEC, "shape": [1, 8, 7]}, "d.shape", "[1, 8, 7] (56 elements)"),
    ({**DIGITS_SPEC, "label": 3}, "d.label", "3 (int)"),
    ({**DIGITS_SPEC, "file": "other"}, "d.file", '"other" (str)'),
    ({**DIGITS_SPEC, "format": "xlsx"}, "d.format", '"xlsx" (str)'),
    ({**DIGITS_SPEC, "divisor": 1e-50}, "d.divisor", "1e-50 (float)"),
    ({**DIGITS_SPEC, "features": [5, 5]}, "d.features", "[5, 5] (list)"),
    ({**NPY, "x": "digits"}, "d.y", '"y" (str)'),
    ({"format": "text", "file": "digits", "vocabulary": "words"}, "d.vocabulary", '"words"'),
    ({"format": "npz", "file": "digits", "x": "", "y": "b", "classes": 2}, "d.x", '"" (str)'),
    ([1], "d", "[1] (list)"),
])
def test_spec_problems_name_each_key(spec: Any, key: str, fragment: str) -> None:
    """Each schema problem is reported once, under its dotted key, with what was found."""
    problems = formats.spec_problems(spec, "d", ["digits"])
    assert [p[0] for p in problems] == [key] and fragment in problems[0][2], problems


def test_spec_problems_accepts_valid_specs() -> None:
    """The digits spec and one spec of each other format have no problems."""
    names = ["digits", "x", "y"]
    for spec in (DIGITS_SPEC, NPY, {**NPZ, "file": "x"}, {**IDX, "x": "x", "y": "y"},
                 {"format": "text", "file": "x", "vocabulary": "bytes"}):
        assert formats.spec_problems(spec, "d", names) == [], spec
    assert formats.spec_problems({}, "", []) == [("format", "one of " + ", ".join(
        formats.FORMATS), "missing")]


def test_decode_refuses_an_invalid_spec(tmp_path: Path) -> None:
    """decode checks the schema first: an invalid spec is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=r"spec\.label"):
        formats.decode({**DIGITS_SPEC, "label": "64"}, {"digits": tmp_path / "none"})


def test_files_of_is_ordered() -> None:
    """files_of lists x before y, once each, and the single file otherwise."""
    assert formats.files_of({**NPY, "x": "b", "y": "a"}) == ["b", "a"]
    assert formats.files_of({**IDX, "x": "a", "y": "a"}) == ["a"]
    assert formats.files_of(DIGITS_SPEC) == ["digits"]
    assert formats.FORMATS == ("csv", "npy", "npz", "idx", "text", "images", "parquet", "arrow")
