"""Tests for real-valued CSV columns (pipeline/data/delimited.py, schema):
decimals without a value_range; a value_range of real bounds with
``values = "real"``; the integer default of a value_range names the way out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.core.errors import DataIntegrityError, UsageError
from pipeline.data import dataset, manifest
from pipeline.data.add import add

ROWS = "17.99,10.38,0\n-0.5,1e-3,1\n2,.25,0\n3.5E2,4,1\n"


def _load(tmp: Path, text: str, **decode: Any) -> dataset.Dataset:
    root = tmp / "p"
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "t.csv").write_text(text)
    path = root / "data-manifest.json"
    add(path, root / "data" / "t.csv", name="t", source="", licence="", description="",
        fmt="csv", options={"features": [0, 2], "label": 2, "classes": 2, **decode}, force=True)
    verified = manifest.verify(path)
    return dataset.load(verified, "t", tmp / "cache")


def test_decimals_decode_as_float32_of_the_correctly_rounded_value(tmp_path: Path) -> None:
    ds = _load(tmp_path, ROWS, divisor=4)
    want = np.array([[17.99, 10.38], [-0.5, 1e-3], [2, 0.25], [350, 4]], np.float64)
    assert ds.x.tolist() == (want.astype(np.float32) / np.float32(4)).tolist()
    assert ds.y.tolist() == [0, 1, 0, 1]


def test_a_real_value_range_bounds_real_values(tmp_path: Path) -> None:
    ds = _load(tmp_path, ROWS, value_range=[-1.0, 400.5], values="real")
    assert ds.x[0].tolist() == np.array([17.99, 10.38], np.float32).tolist()
    with pytest.raises(DataIntegrityError, match=r"column 0 \(feature\): in -1.0..17.5 "
                                                 r"\(value_range\), found '17.99'") as e:
        _load(tmp_path, ROWS, value_range=[-1.0, 17.5], values="real")
    assert "t.csv:1: expected column 0" in str(e.value)


def test_a_value_range_alone_means_integers_and_the_error_says_how_to_take_reals(
        tmp_path: Path) -> None:
    with pytest.raises(DataIntegrityError, match="an integer") as e:
        _load(tmp_path, ROWS, value_range=[0, 400])
    assert 'values = "real"' in str(e.value) and "t.csv:1: expected column 0" in str(e.value)
    ints = _load(tmp_path, "1,2,0\n3,4,1\n", value_range=[0, 400])  # control: integers pass
    assert ints.x.tolist() == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize("decode", [{"values": "float"}, {"value_range": [0, "9"]},
                                    {"value_range": [5.5, 1.0]}, {"value_range": [0, 1e400]}])
def test_bad_value_specs_are_usage_errors(tmp_path: Path, decode: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        _load(tmp_path, ROWS, **decode)
