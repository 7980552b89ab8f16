"""Tables for the Dagster UI: rows as table metadata (``dg.MetadataValue.table``), which the UI
shows with typed, sortable columns, rather than markdown."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import dagster as dg
import polars as pl

# A column: (name, type) or (name, type, description); types are Dagster's ("string", "int",
# "float", "bool").
Column = tuple[str, str] | tuple[str, str, str]


def cell(value: Any) -> str | int | float | bool | None:
    """A value a table record can hold. Non-finite floats become the strings "nan", "inf" and
    "-inf" (as in report.json: the UI reads records as JSON, which has no such numbers); numpy
    scalars become Python numbers."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def table(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> dg.TableMetadataValue:
    """`rows` (each a mapping from column name to value; a missing one is null) as table metadata."""
    schema = dg.TableSchema(columns=[
        dg.TableColumn(name=c[0], type=c[1], description=c[2] if len(c) > 2 else None) for c in columns
    ])
    records = [dg.TableRecord({c[0]: cell(row.get(c[0])) for c in columns}) for row in rows]
    return dg.MetadataValue.table(records=records, schema=schema)


def _column_type(dtype: pl.DataType) -> str:
    if dtype == pl.Boolean:
        return "bool"
    if dtype.is_integer():
        return "int"
    if dtype.is_float():
        return "float"
    return "string"


def frame_table(frame: pl.DataFrame) -> dg.TableMetadataValue:
    """A polars frame as table metadata, its columns typed by their dtypes."""
    return table(frame.iter_rows(named=True), [(name, _column_type(dtype)) for name, dtype in frame.schema.items()])
