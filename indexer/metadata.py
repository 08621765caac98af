"""Metadata: the extra fields of a gallery manifest, their types, their storage and filters.

A JSONL line's keys (a CSV's columns) other than :data:`RESERVED_KEYS` are metadata fields.
A field has one type over the whole gallery, inferred from its values:

- ``string``; ``number`` (int or float; a boolean is not a number); ``boolean``;
- ``string_list`` (a JSON list of strings).

``null`` and a missing key are the same: the row has no value, and no condition on that field
matches it. A value of another type than the field's (``"2024"`` in a column of numbers, a
nested object) is a :class:`UsageError` naming the manifest file and line.

In ``metadata.sqlite`` (schema :data:`METADATA_FIELDS_SCHEMA`, alongside
:data:`indexer.store.METADATA_SCHEMA`) ``image_fields`` lists the fields and their types,
``image_metadata`` keeps each image's fields as written (JSON) for its record, and
``image_values`` holds one row per (image, field, value): strings in ``text_value``, numbers
and booleans (0/1) in ``num_value``, a list one row per element. Its two indexes make every
filter condition an index range scan. Versions written before these tables existed have no
fields (:func:`read_fields` returns ``{}``).

Filters are JSON objects, their entries ANDed::

    {"album": "2024"}                       equality (a string_list field: contains it)
    {"colours": {"in": ["red", "blue"]}}    any of 1..1000 values
    {"year": {"gte": 2020, "lt": 2024}}     numeric ranges: gte, gt, lte, lt (number fields)

:func:`filter_sql` turns one into the SQL that selects the matching image rows, or raises
:class:`FilterError` naming the field (and, for an unknown one, the known fields).
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

from indexer.errors import StoreError, UsageError

FieldType = Literal["string", "number", "boolean", "string_list"]
FIELD_TYPES: tuple[FieldType, ...] = get_args(FieldType)
RESERVED_KEYS = frozenset({"path", "id", "captions", "caption"})
RANGE_OPERATORS: dict[str, str] = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<"}
OPERATORS = ("in", *RANGE_OPERATORS)
MAX_IN_VALUES = 1000
# The most text (characters of field names and string values, together) one filter may hold:
# it travels into the SQL parameters and the selection cache key.
MAX_FILTER_TEXT = 64 * 1024
_SQLITE_MAX_INT = 2**63 - 1
_FLOAT_MAX = sys.float_info.max  # numbers are stored as sqlite integers or REALs (doubles)

METADATA_FIELDS_SCHEMA = """
CREATE TABLE image_fields (name TEXT PRIMARY KEY, type TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE image_metadata (row INTEGER PRIMARY KEY, fields TEXT NOT NULL);
CREATE TABLE image_values (row INTEGER NOT NULL, field TEXT NOT NULL, text_value TEXT, num_value);
CREATE INDEX image_values_by_text ON image_values (field, text_value, row);
CREATE INDEX image_values_by_number ON image_values (field, num_value, row);
"""
# num_value has no declared type on purpose: ints stay ints, floats stay floats, and sqlite
# still compares them numerically.


class FilterError(StoreError):
    """A filter the index cannot apply; the message names the field / operator and, for an
    unknown field, the known ones."""

    def __init__(self, message: str, *, field: str | None = None, known: Sequence[str] = ()):
        super().__init__(message)
        self.field = field  # the offending field, or None for a malformed filter as a whole
        self.known = sorted(known)  # the index's field names


@dataclass(frozen=True)
class MetadataField:
    """One metadata field of an index version and the type of all its values."""

    name: str
    type: FieldType


# ---------------------------------------------------------------------- types
def value_type(value: Any) -> FieldType | None:
    """The field type of one manifest value; None for ``null``. Raises ValueError (with the
    reason) for a value metadata cannot hold."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        if abs(value) > _FLOAT_MAX:  # a float (sqlite's REAL) cannot hold it
            raise ValueError(
                f"an integer of {_digits(value)} digits is beyond the range of a number "
                f"(±{_FLOAT_MAX:.4g})"
            )
        return "number"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        return "number"
    if isinstance(value, str):
        if not is_text(value):
            raise ValueError(f"{preview(value)} is not valid UTF-8 text (a lone surrogate)")
        return "string"
    if isinstance(value, list):
        if all(isinstance(item, str) for item in value):
            for item in value:
                if not is_text(item):
                    raise ValueError(f"{preview(item)} is not valid UTF-8 text (a lone surrogate)")
            return "string_list"
        raise ValueError(f"a list must hold only strings, got {preview(value)}")
    raise ValueError(
        f"a {type(value).__name__} value ({preview(value)}) is not a string, number, boolean "
        "or list of strings"
    )


def _digits(value: int) -> str:
    """How many decimal digits an int has, without converting it to text (which Python
    refuses beyond 4300 digits); approximate for the largest."""
    bits = abs(value).bit_length()
    return str(len(str(abs(value)))) if bits < 4000 else f"about {int(bits * math.log10(2)) + 1}"


def preview(value: Any, limit: int = 80) -> str:
    """``value`` as (truncated) JSON for a message; never fails (a huge int, deep nesting)."""
    try:
        text = json.dumps(value, default=repr)
    except (ValueError, TypeError, RecursionError):
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_text(value: str) -> bool:
    """Whether ``value`` can be written as UTF-8 (no lone surrogates, which JSON's ``\\ud800``
    escapes can produce)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def infer_field_types(records: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, FieldType]:
    """The type of each field over ``(origin, fields)`` records, in first-seen order.

    ``origin`` ("file:line") goes into the :class:`UsageError` raised for a value of another
    type than the field's earlier values, or one metadata cannot hold. Fields whose values are
    all ``null`` get no type and are left out.
    """
    types: dict[str, FieldType] = {}
    first_seen: dict[str, tuple[str, Any]] = {}
    for origin, fields in records:
        for name, value in fields.items():
            if not is_text(name):
                raise UsageError(
                    f"{origin}: metadata field {name!r} is not valid UTF-8 text (a lone surrogate)"
                )
            try:
                found = value_type(value)
            except ValueError as exc:
                raise UsageError(f"{origin}: metadata field {name!r}: {exc}") from exc
            if found is None:
                continue
            expected = types.setdefault(name, found)
            if name not in first_seen:
                first_seen[name] = (origin, value)
            elif found != expected:
                where, example = first_seen[name]
                raise UsageError(
                    f"{origin}: metadata field {name!r} is a {found} here ({value!r:.60}) but a "
                    f"{expected} at {where} ({example!r:.60}); give one type per field"
                )
    return types


# ---------------------------------------------------------------------- storage
def write_field_values(
    connection: sqlite3.Connection,
    rows: Sequence[tuple[int, Mapping[str, Any]]],
    types: Mapping[str, FieldType],
) -> None:
    """Fill the tables of :data:`METADATA_FIELDS_SCHEMA` (already created) with ``(row,
    fields)`` pairs whose values have the given ``types``."""
    connection.executemany(
        "INSERT INTO image_fields (name, type) VALUES (?, ?)", sorted(types.items())
    )
    present = [
        (row, {name: value for name, value in fields.items() if value is not None})
        for row, fields in rows
    ]
    connection.executemany(
        "INSERT INTO image_metadata (row, fields) VALUES (?, ?)",
        ((row, json.dumps(fields, ensure_ascii=False)) for row, fields in present if fields),
    )
    connection.executemany(
        "INSERT INTO image_values (row, field, text_value, num_value) VALUES (?, ?, ?, ?)",
        (
            (row, name, text, number)
            for row, fields in present
            for name, value in fields.items()
            for text, number in _stored_values(value, types[name])
        ),
    )


def _stored_values(value: Any, kind: FieldType) -> list[tuple[str | None, int | float | None]]:
    if kind == "string_list":
        return [(item, None) for item in dict.fromkeys(value)]
    if kind == "string":
        return [(value, None)]
    return [(None, _sql_number(value))]


def _sql_number(value: int | float | bool) -> int | float:
    """A number sqlite can hold (its integers are 64-bit); booleans as 0 / 1."""
    if isinstance(value, int) and abs(value) > _SQLITE_MAX_INT:
        return float(value)
    return value


def read_fields(connection: sqlite3.Connection) -> dict[str, MetadataField]:
    """The fields of a ``metadata.sqlite``, by name (sorted); ``{}`` when it has no field table."""
    (has_table,) = connection.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'image_fields'"
    ).fetchone()
    if not has_table:
        return {}
    return {
        name: MetadataField(name, cast(FieldType, kind))
        for name, kind in connection.execute("SELECT name, type FROM image_fields ORDER BY name")
        if kind in FIELD_TYPES
    }


# ---------------------------------------------------------------------- filters
def filter_sql(
    filter: Mapping[str, Any], fields: Mapping[str, MetadataField]
) -> tuple[str, list[Any]]:
    """SQL (and its parameters) selecting the image rows that match ``filter``, in no set
    order and, for one condition on a string_list field, possibly repeated (sorting and
    de-duplicating half a million ids costs less in numpy than in sqlite).

    Each condition is an index range scan of ``image_values``; conditions are intersected.
    ``filter`` must be non-empty. Raises :class:`FilterError`.
    """
    if not isinstance(filter, Mapping):
        raise FilterError(
            f"a filter must be a JSON object of field conditions, got {type(filter).__name__}",
            known=list(fields),
        )
    if not filter:
        raise FilterError("an empty filter selects nothing to filter on", known=list(fields))
    for name in filter:
        if not isinstance(name, str) or not is_text(name):
            raise FilterError(
                f"a filter field name must be valid UTF-8 text, got {preview(name)}",
                known=list(fields),
            )
    parts: list[str] = []
    parameters: list[Any] = []
    # Sorted fields, operators and values: equal filters give equal SQL (the selection cache key).
    for name, condition in sorted(filter.items(), key=lambda item: str(item[0])):
        field = fields.get(name)
        if field is None:
            known = ", ".join(sorted(fields)) or "none (this index has no metadata)"
            raise FilterError(
                f"unknown metadata field {name!r}; known fields: {known}",
                field=str(name),
                known=list(fields),
            )
        for sql, values in _conditions(field, condition, list(fields)):
            parts.append(f"SELECT row FROM image_values WHERE field = ? AND {sql}")
            parameters += [field.name, *values]
    text = sum(len(value) for value in parameters if isinstance(value, str))
    if text > MAX_FILTER_TEXT:
        raise FilterError(
            f"the filter holds {text} characters of field names and values; at most "
            f"{MAX_FILTER_TEXT} are allowed",
            known=list(fields),
        )
    return " INTERSECT ".join(parts), parameters


def _conditions(
    field: MetadataField, condition: Any, known: list[str]
) -> list[tuple[str, list[Any]]]:
    """``(sql, parameters)`` per condition on one field."""
    column = "text_value" if field.type in ("string", "string_list") else "num_value"
    if not isinstance(condition, Mapping):
        if isinstance(condition, list):
            raise FilterError(
                f"metadata field {field.name!r}: a list is not a value to compare with; "
                f'use {{"in": [...]}} for any of several values',
                field=field.name,
                known=known,
            )
        return [(f"{column} = ?", [_operand(field, condition, "=", known)])]
    if not condition:
        raise FilterError(
            f"metadata field {field.name!r}: an empty condition; use a value or one of the "
            f"operators {', '.join(OPERATORS)}",
            field=field.name,
            known=known,
        )
    conditions: list[tuple[str, list[Any]]] = []
    bounds: list[tuple[str, Any]] = []  # range operators: one index range scan together
    for operator, operand in condition.items():
        if operator == "in":
            if not isinstance(operand, list) or not 1 <= len(operand) <= MAX_IN_VALUES:
                raise FilterError(
                    f"metadata field {field.name!r}: 'in' takes a list of 1 to {MAX_IN_VALUES} "
                    f"values, got {preview(operand)}",
                    field=field.name,
                    known=known,
                )
            values = sorted({_operand(field, v, "in", known) for v in operand})
            conditions.append((f"{column} IN ({','.join('?' * len(values))})", values))
        elif operator in RANGE_OPERATORS:
            if field.type != "number":
                raise FilterError(
                    f"metadata field {field.name!r} is a {field.type}: the range operator "
                    f"{operator!r} applies to number fields only",
                    field=field.name,
                    known=known,
                )
            bounds.append((operator, _operand(field, operand, operator, known)))
        else:
            raise FilterError(
                f"metadata field {field.name!r}: unknown operator {operator!r}; "
                f"allowed operators: {', '.join(OPERATORS)}",
                field=field.name,
                known=known,
            )
    if bounds:
        bounds.sort()
        sql = " AND ".join(f"num_value {RANGE_OPERATORS[operator]} ?" for operator, _ in bounds)
        conditions.append((sql, [number for _, number in bounds]))
    return conditions


def _operand(field: MetadataField, value: Any, operator: str, known: list[str]) -> Any:
    """``value`` as an SQL parameter if it has the field's (element) type, else FilterError."""
    wanted = {"string": "string", "string_list": "string", "number": "number"}.get(
        field.type, "boolean"
    )
    reason = ""
    try:
        found = value_type(value)
    except ValueError as exc:
        found, reason = None, f" ({exc})"
    if found != wanted:
        raise FilterError(
            f"metadata field {field.name!r} is a {field.type}: {operator!r} needs a {wanted}, "
            f"got {preview(value)}{reason}",
            field=field.name,
            known=known,
        )
    return (
        int(value) if wanted == "boolean" else _sql_number(value) if wanted == "number" else value
    )
