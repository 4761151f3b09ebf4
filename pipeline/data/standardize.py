"""Per-column standardisation of a classification dataset's inputs
(``data.standardize = true``), with statistics from the training split only.

Fixed arithmetic, so the statistics and the standardised inputs are the same
bits on every machine, BLAS and NumPy build:

- column ``c``'s mean is ``fsum(x[:, c]) / n`` over the training rows (their
  float32 values, exact in float64; ``math.fsum`` is correctly rounded, so the
  order of the rows does not matter), one float64 division;
- its standard deviation is ``sqrt(fsum((x[:, c] - mean_c) ** 2) / n)`` (the
  population deviation, as scikit-learn's StandardScaler), each difference and
  square one float64 operation; a column with deviation 0 gets 1 (it is then
  only centred);
- every input (training and test rows, and later the rows `pipeline predict`
  reads) becomes ``float32((float64(x) - mean_c) / std_c)``: two float64
  operations and one rounding to float32, elementwise.

The statistics (float64, as JSON numbers, which round-trip exactly) are part of
the run's ``data`` record (``data.standardize``): keyed, compared by
``verify``, ``pipeline.load`` and ``eval``, and applied by ``predict``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import CheckpointError, ConfigError, DataIntegrityError
from .dataset import Dataset
from .mapped import Rows

__all__ = ["Standardizer", "fit", "standardized", "MAX_COLUMNS"]

MAX_COLUMNS = 1 << 16  # per-column statistics are for tables; an image has other means


@dataclass(frozen=True, eq=False)
class Standardizer:
    """Column means and deviations (float64, (F,)) and the rows they came from."""

    mean: np.ndarray
    std: np.ndarray
    rows: int

    def apply(self, x: np.ndarray, where: str = "the inputs") -> np.ndarray:
        """``x`` (N, *shape) float32 standardised column by column (float32).
        ConfigError if ``x`` has another number of columns than the statistics;
        DataIntegrityError naming ``where``, the row and the column if a value
        leaves float32's range (it would train or predict on inf)."""
        flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        if flat.shape[1] != len(self.mean):
            raise ConfigError("data.standardize", [
                f"{where}: expected rows of {len(self.mean)} values (the columns the "
                f"statistics were computed over), found {flat.shape[1]}"])
        with np.errstate(over="ignore"):  # an overflow to inf is found below
            out = ((flat - self.mean) / self.std).astype(np.float32)
        if not (finite := np.isfinite(out)).all():
            row, col = (int(v[0]) for v in np.nonzero(~finite))
            raise DataIntegrityError(where, f"values whose standardised form (x - mean) / "
                                     f"std fits in float32", f"row {row}, column {col}: "
                                     f"{flat[row, col]!r} -> {out[row, col]} (mean "
                                     f"{self.mean[col]!r}, std {self.std[col]!r})")
        return out.reshape(np.shape(x))

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "mean": [float(v) for v in self.mean],
                "std": [float(v) for v in self.std]}

    @classmethod
    def from_json(cls, raw: Any, where: str) -> Standardizer:
        """The statistics a run records (``data.standardize``); CheckpointError
        for anything else."""
        ok = (isinstance(raw, Mapping) and set(raw) == {"rows", "mean", "std"}
              and type(raw["rows"]) is int and raw["rows"] > 0
              and all(isinstance(raw[k], list) and raw[k] for k in ("mean", "std"))
              and len(raw["mean"]) == len(raw["std"])
              and all(type(v) is float and math.isfinite(v) for v in raw["mean"] + raw["std"])
              and all(v > 0 for v in raw["std"]))
        if not ok:
            raise CheckpointError(where, "the statistics of data.standardize (rows, and finite "
                                  "mean and std > 0 lists of one length)", repr(raw)[:120])
        return cls(np.array(raw["mean"], np.float64), np.array(raw["std"], np.float64),
                   raw["rows"])


def fit(ds: Dataset, train_ids: np.ndarray) -> Standardizer:
    """The statistics of ``ds``'s training rows ``train_ids`` (see the module
    docstring). ConfigError for a language model's tokens, or too many columns."""
    if ds.task.windows:
        raise ConfigError("data.standardize", [
            f"data.standardize: expected a classification dataset (per-column statistics "
            f"of its inputs), found {ds.name!r}, a {ds.task.name} dataset of tokens"])
    columns = math.prod(ds.input_shape)
    if columns > MAX_COLUMNS:
        raise ConfigError("data.standardize", [
            f"data.standardize: expected a table of at most {MAX_COLUMNS} columns, found "
            f"{ds.name!r} with {columns} (input shape {ds.input_shape}); per-pixel statistics "
            f"are not what an image model wants"])
    ids = np.sort(np.asarray(train_ids, dtype=np.int64))
    if len(ids) == 0:
        raise ConfigError("data.standardize", [
            "data.standardize: expected training rows to compute statistics from, found none"])
    x = _rows(ds, ids).astype(np.float64).reshape(len(ids), -1)
    n = float(len(ids))
    mean = np.array([math.fsum(col) / n for col in x.T], dtype=np.float64)
    dev = x - mean
    var = np.array([math.fsum(col) / n for col in (dev * dev).T], dtype=np.float64)
    std = np.sqrt(var)
    return Standardizer(mean, np.where(std > 0, std, 1.0), len(ids))


def standardized(ds: Dataset, st: Standardizer) -> Dataset:
    """``ds`` with every input row standardised by ``st`` (held in memory). Its
    ``decoded`` hash stays the decode's: the data a run depends on is the
    files' decode; the statistics are recorded beside it."""
    x = _rows(ds, np.arange(len(ds.x), dtype=np.int64))
    return dataclasses.replace(ds, x=st.apply(x, f"dataset {ds.name!r} (standardised)"),
                               decoded=ds.decoded_sha256())


def _rows(ds: Dataset, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` as float32, from memory or from a mapped file (Rows.take)."""
    return ds.x.take(ids) if isinstance(ds.x, Rows) else ds.x[ids]
