"""The options every search takes besides its query: ``k``, ``offset``, ``min_score`` and a
metadata ``filter`` — one description of each (for the JSON schemas and the query parameters
alike), their checks, and the parsing of their text forms (query string, multipart parts).

Filter grammar (a JSON object, its entries ANDed; :meth:`indexer.store.IndexVersion.select`
checks fields and types against the served index)::

    {"shapes": "circle"}                  equality (a list field: it contains the value)
    {"colours": {"in": ["red", "blue"]}}  one of
    {"objects": {"gte": 2}}               numeric range: gte, gt, lte, lt (several may be combined)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import WithJsonSchema

from service.errors import InvalidInput
from service.retrieval import Page
from service.uploads import MAX_OPTION_PART_BYTES, ImageUpload

# Fields of the demo gallery (`make demo`), so that the example runs there as it is.
FILTER_EXAMPLE: dict[str, Any] = {"shapes": "circle", "objects": {"gte": 2}}
# The longest filter accepted as JSON text in the query string: as for a multipart part.
MAX_FILTER_TEXT = MAX_OPTION_PART_BYTES
FILTER_DESCRIPTION = (
    "Only results whose gallery-image metadata matches, all entries ANDed: "
    '`{"field": value}` equality (for a list field: contains the value), '
    '`{"field": {"in": [v1, v2]}}`, `{"field": {"gte"|"gt"|"lte"|"lt": number}}`. A caption '
    "matches when the image it describes does. Applied inside the vector search, so k results "
    "come back whenever k match. An unknown field is a 422 listing the known ones (GET /readyz "
    "lists them: `metadata_fields`). `{}` or null: no filter."
)
MIN_SCORE_DESCRIPTION = (
    "Drop results whose cosine similarity (`retrieval_score`, -1..1) is below this, also when "
    "re-ranked (the teacher's logit is unbounded, so it is not what this compares). Applied "
    "before `offset`, so fewer than k results may come back; `count` says how many."
)
_INTEGER = re.compile(r"^-?[0-9]{1,9}$")

_SCALAR_SCHEMA: list[dict[str, Any]] = [
    {"type": "string"},
    {"type": "number"},
    {"type": "boolean"},
]
FILTER_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": FILTER_DESCRIPTION,
    "additionalProperties": {
        "anyOf": [
            *_SCALAR_SCHEMA,
            {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": {
                    "in": {"type": "array", "minItems": 1, "items": {"anyOf": _SCALAR_SCHEMA}},
                    **{op: {"type": "number"} for op in ("gte", "gt", "lte", "lt")},
                },
            },
        ]
    },
    "examples": [FILTER_EXAMPLE],
}
# A filter in a JSON body: any object (the index checks its fields), documented by its grammar.
SearchFilter = Annotated[dict[str, Any], WithJsonSchema(FILTER_JSON_SCHEMA)]


def offset_description(max_k: int) -> str:
    return (
        f"Skip this many results (paging): 0 to {max_k - 1}, and offset + k at most {max_k}. "
        "Page n (from 0) of size k is offset n*k. With re-rank, the teacher re-orders the best "
        "`rerank_k` by cosine and the page is cut from that order afterwards."
    )


def make_page(k: int, offset: int, min_score: float | None, max_k: int, source: str) -> Page:
    """The :class:`Page` a request asks for, or 422 when ``offset + k`` exceeds ``max_k``
    (``source``: where the fields came from, "body" or "query", for the error's location)."""
    if offset + k > max_k:
        raise InvalidInput(
            f"offset + k must be at most {max_k}; got offset {offset} + k {k} = {offset + k}",
            details=[
                {
                    "loc": [source, "offset"],
                    "msg": f"offset + k must be at most {max_k}",
                    "type": "page_too_deep",
                }
            ],
        )
    return Page(k=k, offset=offset, min_score=min_score)


def _invalid(name: str, source: str, message: str, kind: str) -> InvalidInput:
    return InvalidInput(message, details=[{"loc": [source, name], "msg": message, "type": kind}])


def parse_int_field(name: str, value: str, low: int, high: int) -> int:
    """A text field (a multipart part) as an int in ``[low, high]``, else 422 naming it."""
    if not _INTEGER.match(value) or not low <= int(value) <= high:
        raise _invalid(
            name,
            "body",
            f"{name} must be an integer from {low} to {high}, got {value[:40]!r}",
            "int_range",
        )
    return int(value)


def parse_min_score_field(value: str) -> float:
    """A text ``min_score`` (a multipart part) as a float in [-1, 1], else 422."""
    try:
        score = float(value)
    except ValueError:
        score = math.nan
    if not -1.0 <= score <= 1.0:  # NaN fails too
        raise _invalid(
            "min_score",
            "body",
            f"min_score must be a number from -1 to 1, got {value[:40]!r}",
            "float_range",
        )
    return score


def parse_filter_field(value: str, source: str) -> dict[str, Any] | None:
    """A filter sent as JSON text (a ``filter`` query parameter or multipart part): the object,
    None when empty (``""``, ``{}``, ``null``), else 422 saying what is wrong with the text."""
    if not value.strip():
        return None
    if len(value) > MAX_FILTER_TEXT:
        raise _invalid(
            "filter",
            source,
            f"filter is {len(value)} characters long; at most {MAX_FILTER_TEXT} are allowed",
            "too_long",
        )
    try:
        parsed = json.loads(value)
    except ValueError as exc:  # also an int of over 4300 digits
        raise _invalid(
            "filter", source, f"filter is not valid JSON: {exc}", "json_invalid"
        ) from exc
    except RecursionError as exc:
        raise _invalid(
            "filter", source, "filter is not valid JSON: nested too deeply", "json_invalid"
        ) from exc
    if parsed is not None and not isinstance(parsed, dict):
        raise _invalid(
            "filter",
            source,
            f"filter must be a JSON object, got {type(parsed).__name__} {value[:60]!r}",
            "dict_type",
        )
    return parsed or None


@dataclass(frozen=True)
class QueryOptions:
    """The search options of an image query's query string (multipart parts override them)."""

    k: int
    offset: int
    min_score: float | None
    filter_json: str | None


def upload_options(
    upload: ImageUpload, query: QueryOptions, max_k: int
) -> tuple[Page, dict[str, Any] | None]:
    """The page and filter of an upload: each multipart part, else its query parameter; 422
    for a bad value or ``offset + k`` over ``max_k``."""
    parts = upload.fields
    k = parse_int_field("k", parts["k"], 1, max_k) if "k" in parts else query.k
    offset = (
        parse_int_field("offset", parts["offset"], 0, max_k - 1)
        if "offset" in parts
        else query.offset
    )
    min_score = (
        parse_min_score_field(parts["min_score"]) if "min_score" in parts else query.min_score
    )
    if "filter" in parts:
        metadata_filter = parse_filter_field(parts["filter"], "body")
    else:
        metadata_filter = parse_filter_field(query.filter_json or "", "query")
    source = "body" if {"k", "offset"} & parts.keys() else "query"
    return make_page(k, offset, min_score, max_k, source), metadata_filter
