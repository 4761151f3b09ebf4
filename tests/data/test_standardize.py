"""Tests for pipeline/data/standardize.py: per-column statistics of the
training split, in the fixed arithmetic its docstring specifies, checked
against a pure-Python reference (fractions and IEEE doubles, no NumPy)."""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import numpy as np
import pytest

from pipeline.core.errors import CheckpointError, ConfigError
from pipeline.data.dataset import Dataset
from pipeline.data.standardize import MAX_COLUMNS, Standardizer, fit, standardized
from pipeline.data.task import CLASSIFICATION, LM


def _ds(x: np.ndarray, shape: tuple[int, ...] | None = None) -> Dataset:
    n = len(x)
    return Dataset("t", "0" * 64, CLASSIFICATION, x.astype(np.float32),
                   np.zeros(n, np.int64), shape or x.shape[1:], 2, n)


def _table(seed: int = 0, n: int = 200) -> np.ndarray:
    """Columns at very different scales, with values whose float32 sums
    depend on their order (the control below shows it)."""
    r = np.random.default_rng(seed)
    return np.stack([r.normal(0, 1, n) * 1e4 + 3e4, r.normal(0, 1, n) * 1e-3,
                     r.uniform(0, 1, n), np.full(n, 7.0)], axis=1).astype(np.float32)


def _f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _reference(x: np.ndarray, ids: list[int]) -> tuple[list[float], list[float]]:
    """The spec read with Python numbers: correctly rounded sums (exact
    fractions), IEEE double differences, squares, divisions and sqrt."""
    means, stds = [], []
    n = float(len(ids))
    for c in range(x.shape[1]):
        col = [float(x[i, c]) for i in ids]
        mean = float(sum(map(Fraction, col))) / n
        var = float(sum(Fraction((v - mean) * (v - mean)) for v in col)) / n
        std = math.sqrt(var)
        means.append(mean)
        stds.append(std if std > 0 else 1.0)
    return means, stds


def test_statistics_and_outputs_are_the_specs_bits() -> None:
    x = _table()
    ids = list(range(0, 200, 3))
    st = fit(_ds(x), np.array(ids))
    means, stds = _reference(x, ids)
    assert st.mean.tolist() == means and st.std.tolist() == stds and st.rows == len(ids)
    out = standardized(_ds(x), st).x
    want = [[_f32((float(x[i, c]) - means[c]) / stds[c]) for c in range(4)] for i in range(200)]
    assert out.dtype == np.float32 and out.tolist() == want
    assert out[:, 3].tolist() == [0.0] * 200  # a constant column: centred, deviation 1


def test_the_order_of_the_training_rows_does_not_change_a_bit() -> None:
    x = _table()
    ids = np.arange(150)
    a = fit(_ds(x), ids)
    b = fit(_ds(x), np.random.default_rng(1).permutation(ids))
    assert a.to_json() == b.to_json()
    # control: a running float32 sum of these columns does depend on the order
    col = x[:150, 0]
    fwd = np.cumsum(col, dtype=np.float32)[-1]
    rev = np.cumsum(col[np.random.default_rng(1).permutation(150)], dtype=np.float32)[-1]
    assert fwd != rev


def test_only_the_training_rows_count() -> None:
    x = _table()
    ids = np.arange(150)
    before = fit(_ds(x), ids).to_json()
    y = x.copy()
    y[170, 1] = 123.0  # a test row
    assert fit(_ds(y), ids).to_json() == before
    y[10, 1] = 123.0  # control: a training row
    assert fit(_ds(y), ids).to_json() != before


def test_image_shaped_inputs_are_standardised_per_value_and_keep_their_shape() -> None:
    x = _table().reshape(200, 1, 2, 2)
    st = fit(_ds(x), np.arange(200))
    out = standardized(_ds(x), st)
    assert out.x.shape == (200, 1, 2, 2) and len(st.mean) == 4
    assert out.decoded == _ds(x).decoded_sha256()  # the decode's hash, not the outputs'


def test_tokens_and_too_wide_inputs_are_refused() -> None:
    lm = Dataset("text", "0" * 64, LM, np.arange(100, dtype=np.int64), None, (), 10, 100)
    with pytest.raises(ConfigError, match="classification dataset"):
        fit(lm, np.arange(10))
    wide = Dataset("w", "0" * 64, CLASSIFICATION, np.zeros((2, MAX_COLUMNS + 1), np.float32),
                   np.zeros(2, np.int64), (MAX_COLUMNS + 1,), 2, 2)
    with pytest.raises(ConfigError, match="at most"):
        fit(wide, np.arange(2))


def test_recorded_statistics_round_trip_and_bad_ones_are_refused() -> None:
    st = fit(_ds(_table()), np.arange(100))
    again = Standardizer.from_json(st.to_json(), "run.json")
    assert again.to_json() == st.to_json()
    good = st.to_json()
    for bad in ({**good, "std": [0.0, *good["std"][1:]]},
                {**good, "mean": good["mean"][:-1]},
                {**good, "mean": [math.nan, *good["mean"][1:]]},
                {**good, "rows": True}, {**good, "extra": 1}, [], None):
        with pytest.raises(CheckpointError, match="data.standardize"):
            Standardizer.from_json(bad, "run.json [data.standardize]")
