"""Parquet and Arrow IPC (Feather v2) tables decoded through pyarrow (formats
``parquet`` and ``arrow``; docs/reference/manifest.md). pyarrow is an optional
extra (pyproject.toml's ``parquet``, locked in requirements-parquet.lock):
nothing imports it until a table is decoded, and without it a table's decode is
a UsageError (exit 2) naming the extra, before anything is written.

Named columns, in the spec's order, are the features; one named column the
label. Decoding (fixed, as the csv format decodes the same table):

- the file is memory-mapped (``pa.memory_map``), never read whole: Parquet
  through ``pq.ParquetFile`` on the map (no dataset discovery: a ``key=value``
  directory adds no column), one column at a time, page checksums verified
  where the writer stored them; an Arrow IPC file through
  ``pa.ipc.open_file`` on the map, whose uncompressed buffers are the map
  itself (zero-copy: no byte is copied until the float32 rows are made);
- the schema first: each named column must exist once at the top level and be
  a plain integer (signed or unsigned) or floating-point column for a feature,
  an integer column for the label; a string, boolean, decimal, temporal,
  dictionary-encoded, nested (list, struct, map) or extension column is
  refused naming it, as is a null or a NaN/infinity anywhere in a named column,
  and a label outside ``[0, classes)``;
- the decoded size (rows x columns, and a Parquet file's declared uncompressed
  column sizes) must fit ``max_bytes`` before a value is read;
- ``x[:, j] = float32(column_j) / float32(divisor)`` (an integer column
  through int64 or uint64, a float column as stored: exactly what the csv
  format gives for the same numbers), labels int64.

Which pyarrow decoded is ``decoder_identity()``: part of the decode-cache key
and of a run's ``data`` beside the decoded arrays' hash (``data_decoded``), as
for images: another pyarrow is another run (and ``verify`` says the decoder
differs), never a silent change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import DataIntegrityError, UsageError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["TABLE_FORMATS", "INSTALL", "uses_tables", "decoder_identity", "require", "decode"]

TABLE_FORMATS = ("parquet", "arrow")
INSTALL = (".venv/bin/pip install --require-hashes -r requirements.lock "
           "-r requirements-parquet.lock")
_WHAT = {"parquet": "a Parquet file", "arrow": "an Arrow IPC file (Feather v2)"}


def uses_tables(specs: Sequence[Mapping[str, Any] | None]) -> bool:
    return any(s is not None and s.get("format") in TABLE_FORMATS for s in specs)


def require(where: str) -> Any:
    """The ``pyarrow`` module, or UsageError (exit 2) naming the extra to install."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401 - the readers this module uses
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise UsageError(f"{where} needs the parquet extra (pyarrow), which is not "
                         f"installed ({e}); install it from its lock "
                         f"in the checkout: {INSTALL} (the pin of pyproject.toml's [parquet] "
                         f"extra, every file hashed)") from None
    return pyarrow


def decoder_identity() -> dict[str, Any]:
    """pyarrow's version (what decides the decoded values); UsageError (exit 2)
    naming the extra where it is not installed, as the tokenizers extra does
    (pipeline.data.cache: such a dataset has no cache key here)."""
    return {"pyarrow": require("a dataset of format parquet or arrow").__version__}


def _kind(pa: Any, t: Any) -> str:
    """What a column's type is, in words, for an error."""
    types = pa.types
    if types.is_dictionary(t):
        return f"a dictionary-encoded (categorical) column ({t})"
    if types.is_nested(t):
        return f"a nested column ({t})"
    if isinstance(t, pa.ExtensionType):
        return f"an extension-type column ({t})"
    return f"a {t} column"


def _check_schema(pa: Any, schema: Any, spec: Mapping[str, Any], where: str) -> None:
    """Every named column exists once at the top level, of a type it may have."""
    names = list(schema.names)
    for role, col in [("feature", c) for c in spec["features"]] + [("label", spec["label"])]:
        count = names.count(col)
        if count != 1:
            found = "no such column" if count == 0 else f"{count} columns of that name"
            hint = (f"its columns: {', '.join(names[:40])}" + (", ..." if len(names) > 40
                                                                 else "")) if count == 0 else ""
            raise DataIntegrityError(f"{where} [column {col!r}]", f"one {role} column named "
                                     f"{col!r}", found, hint)
        t = schema.field(col).type
        ok = (pa.types.is_integer(t) if role == "label"
              else pa.types.is_integer(t) or pa.types.is_floating(t))
        if not ok or isinstance(t, pa.ExtensionType):
            want = ("an integer column of class ids" if role == "label"
                    else "a numeric column (integer or floating point)")
            hint = ("map class names to ids 0..classes-1 when writing the table"
                    if role == "label" and (pa.types.is_string(t) or pa.types.is_large_string(t)
                                            or pa.types.is_dictionary(t))
                    else "cast it to int64 or float64 when writing the table"
                    if not pa.types.is_nested(t) else "flatten it into numeric columns")
            raise DataIntegrityError(f"{where} [column {col!r}]", f"{want} ({role})",
                                     _kind(pa, t), hint)


def _bound(n: int, spec: Mapping[str, Any], where: str, declared: int = 0) -> None:
    from .bounded import max_bytes

    limit, width = max_bytes(spec), len(spec["features"])
    need = max(n * (4 * width + 8), declared)
    if need > limit:
        raise DataIntegrityError(where, f"a table whose decode fits max_bytes={limit}",
                                 f"{n} rows x {width} feature columns: {need} bytes",
                                 "raise max_bytes in the decode spec if it is meant")


def _values(pa: Any, column: Any, col: str, role: str, where: str) -> np.ndarray:
    """A column's values as NumPy (int64, uint64 or float), no nulls, no NaN or
    infinity (each refused naming its row)."""
    import numpy as np

    if column.null_count:
        row = int(np.argmax(np.asarray(column.is_null().to_numpy(zero_copy_only=False))))
        raise DataIntegrityError(f"{where} [column {col!r}]", f"a value in every row ({role})",
                                 f"a null in row {row}", "fill or drop the missing values "
                                 "when writing the table")
    values = np.asarray(column.to_numpy())  # chunked: one array (zero-copy for one chunk)
    if values.dtype.kind == "f":
        if not (finite := np.isfinite(values)).all():
            row = int(np.argmin(finite))
            raise DataIntegrityError(f"{where} [column {col!r}]", f"finite numbers ({role})",
                                     f"{values[row]} in row {row}")
    elif values.dtype.kind == "i":
        values = values.astype(np.int64, copy=False)
    else:
        values = values.astype(np.uint64, copy=False)
    return values


def _feature(values: np.ndarray, col: str, spec: Mapping[str, Any], where: str) -> np.ndarray:
    """One feature column, checked against ``value_range``, as float32 / divisor."""
    import numpy as np

    from .mapped import to_float32

    if "value_range" in spec:
        lo, hi = spec["value_range"]
        if (bad := (values < lo) | (values > hi)).any():
            row = int(np.argmax(bad))
            raise DataIntegrityError(f"{where} [column {col!r}]", f"values in {lo}..{hi} "
                                     "(value_range)", f"{values[row]} in row {row}")
    x = to_float32(values, spec.get("divisor", 1))  # f32(value) / f32(divisor), as csv does
    if not (finite := np.isfinite(x)).all():
        row = int(np.argmin(finite))
        raise DataIntegrityError(f"{where} [column {col!r}]", "finite float32 values after "
                                 "dividing by the divisor", f"{values[row]} in row {row}")
    return x


def _columns(pa: Any, fmt: str, source: Any, spec: Mapping[str, Any], where: str
             ) -> tuple[int, Any]:
    """(rows, a function from a column name to its (chunked) column), the schema
    checked and the size bounded before any value is read."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(source, page_checksum_verification=True)
        _check_schema(pa, pf.schema_arrow, spec, where)
        meta, wanted = pf.metadata, {*spec["features"], spec["label"]}
        declared = sum(rg.column(i).total_uncompressed_size
                       for rg in (meta.row_group(g) for g in range(meta.num_row_groups))
                       for i in range(rg.num_columns) if rg.column(i).path_in_schema in wanted)
        _bound(meta.num_rows, spec, where, declared)
        return meta.num_rows, lambda col: pf.read(columns=[col], use_threads=False).column(0)
    reader = pa.ipc.open_file(source)
    _check_schema(pa, reader.schema, spec, where)
    n = reader.count_rows()
    _bound(n, spec, where)
    table = reader.read_all()  # uncompressed: buffers in the map, nothing copied
    table.validate(full=True)  # offsets and lengths within the buffers
    return n, table.column


def decode(spec: Mapping[str, Any], path: Path
           ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(x (n, *shape) float32, y (n,) int64, shape) of the table at ``path``
    (format parquet or arrow), as the module docstring specifies."""
    import numpy as np

    fmt, where = spec["format"], str(path)
    pa = require(where)
    try:
        with pa.memory_map(where, "r") as source:
            n, column = _columns(pa, fmt, source, spec, where)
            if n == 0 or n != spec.get("rows", n):
                raise DataIntegrityError(where, f"{spec.get('rows', 'at least 1')} data rows",
                                         f"{n}")
            raw = _values(pa, column(spec["label"]), spec["label"], "label", where)
            if (bad := (raw < 0) | (raw >= spec["classes"])).any():
                row = int(np.argmax(bad))
                raise DataIntegrityError(f"{where} [column {spec['label']!r}]",
                                         f"labels in 0..{spec['classes'] - 1}",
                                         f"{raw[row]} in row {row} (a label outside the "
                                         "classes)")
            # a copy: a zero-copy column is the map, which would change with the file
            labels = np.array(raw, dtype=np.int64)
            del raw
            x = np.empty((n, len(spec["features"])), dtype=np.float32)
            for j, col in enumerate(spec["features"]):
                values = _values(pa, column(col), col, "feature", where)
                x[:, j] = _feature(values, col, spec, where)
                del values
    except (DataIntegrityError, MemoryError):  # MemoryError: formats.decode names the files
        raise
    except (pa.ArrowException, OSError, ValueError, EOFError) as e:  # not the format, corrupt
        text = str(e).splitlines()[0][:200] if str(e) else ""
        raise DataIntegrityError(where, f"{_WHAT[fmt]} (format {fmt})",
                                 f"{type(e).__name__}: {text}",
                                 "restore the file, or name its real format") from None
    shape = tuple(spec.get("shape", [len(spec["features"])]))
    return x.reshape(n, *shape), labels, shape
