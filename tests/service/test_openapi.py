"""The OpenAPI schema documents every endpoint, and a schemathesis run against the ASGI app
(real tiny model behind it) finds no server error and no schema violation."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import positive_data_acceptance

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import TOKEN, TinyModelEnv


# The schema is loaded at import (schemathesis parametrizes at collection); it depends only on
# the limits, which the served app shares. Requests go to `served_app`, whose lifespan loads the
# tiny model (schemathesis starts that lifespan once and keeps it for the process).
def _valid_images() -> list[bytes]:
    samples = []
    for fmt, mode, size in [
        ("PNG", "RGB", (40, 30)),
        ("PNG", "RGBA", (16, 16)),
        ("PNG", "L", (33, 20)),
        ("JPEG", "RGB", (48, 48)),
        ("JPEG", "CMYK", (20, 30)),
        ("GIF", "P", (24, 24)),
        ("WEBP", "RGB", (32, 16)),
        ("BMP", "RGB", (10, 10)),
        ("TIFF", "RGB", (12, 18)),
    ]:
        buffer = io.BytesIO()
        Image.new(mode, size, "red" if mode != "CMYK" else (0, 200, 200, 0)).save(buffer, fmt)
        samples.append(buffer.getvalue())
    return samples


# JSON Schema cannot say "a decodable image", only "bytes" (format: binary). Tell schemathesis
# what valid bytes are, so its positive cases are real images that reach the model (its
# negative cases and the raw-bytes tests in test_search.py cover everything else). BMP and TIFF
# bodies also need a serializer, which registering the media type provides.
_IMAGES = st.sampled_from(_valid_images())
schemathesis.openapi.format("binary", _IMAGES)
for _media_type in ("image/bmp", "image/tiff"):
    schemathesis.openapi.media_type(_media_type, _IMAGES)

_schema_app = create_app(Settings(reload_token=TOKEN))
schema = schemathesis.openapi.from_dict(_schema_app.openapi())
schema.app = _schema_app
_SERVED: dict[str, Any] = {}


@pytest.fixture(scope="module")
def served_app(tiny_model_env: TinyModelEnv) -> Any:
    if "app" not in _SERVED:
        _SERVED["app"] = create_app(tiny_model_env.settings(reload_token=TOKEN))
    return _SERVED["app"]


def test_every_endpoint_and_error_is_documented(tiny_model_env: TinyModelEnv) -> None:
    spec = create_app(tiny_model_env.settings(reload_token=TOKEN)).openapi()
    paths = spec["paths"]
    assert set(paths) == {
        "/search/images",
        "/search/captions",
        "/search/similar-images",
        "/search/captions-by-text",
        "/images/{image_id}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/admin/reload",
        "/",
        "/examples/query.png",
    }
    expected_errors = {
        ("/search/images", "post"): {"400", "404", "413", "422", "500", "503"},
        ("/search/captions", "post"): {"400", "404", "413", "415", "422", "500", "503"},
        ("/search/similar-images", "post"): {"400", "404", "413", "415", "422", "500", "503"},
        ("/search/captions-by-text", "post"): {"400", "404", "413", "422", "500", "503"},
        ("/images/{image_id}", "get"): {"404", "503"},
        ("/readyz", "get"): {"503"},
        ("/admin/reload", "post"): {"401", "409", "503"},
    }
    for (path, method), statuses in expected_errors.items():
        responses = paths[path][method]["responses"]
        assert statuses <= set(responses), (path, set(responses))
        for status in statuses:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
    text = spec["components"]["schemas"]["TextSearchRequest"]["properties"]
    assert text["k"]["minimum"] == 1 and text["k"]["maximum"] == 100
    assert "1 to 1000 characters" in text["text"]["description"]
    body = paths["/search/captions"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/jpeg", "image/png", "image/webp"} <= set(body)
    assert body["multipart/form-data"]["schema"]["required"] == ["image"]
    assert "examples" in body["image/png"]
    similar = paths["/search/similar-images"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "application/json"} <= set(similar)
    assert similar["application/json"]["schema"]["required"] == ["id"]
    assert "rerank" not in similar["application/json"]["schema"]["properties"]
    # An upload's own gallery image is left out by score, which IVF-PQ only approximates.
    description = " ".join(paths["/search/similar-images"]["post"]["description"].split())
    assert "compressed (IVF-PQ) index the scores are approximate" in description
    assert "the id form leaves the image out by its row" in description
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_every_search_option_is_documented_with_its_limits_and_an_example(
    tiny_model_env: TinyModelEnv,
) -> None:
    spec = create_app(tiny_model_env.settings(max_k=50)).openapi()
    schemas = spec["components"]["schemas"]
    paths = spec["paths"]
    similar_json = paths["/search/similar-images"]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]
    for body in (
        schemas["TextSearchRequest"],
        schemas["CaptionTextSearchRequest"],
        similar_json,
    ):
        fields = body["properties"]
        assert fields["offset"]["minimum"] == 0 and fields["offset"]["maximum"] == 49
        assert "offset + k at most 50" in fields["offset"]["description"]
        assert fields["offset"]["examples"] == [0]
        min_score = fields["min_score"]["anyOf"][0]
        assert (min_score["minimum"], min_score["maximum"]) == (-1, 1)
        assert "retrieval_score" in fields["min_score"]["description"]
        assert fields["min_score"]["examples"]
        assert fields["filter"]["examples"] == [{"shapes": "circle", "objects": {"gte": 2}}]
        assert "unknown field is a 422" in fields["filter"]["description"]
        grammar = fields["filter"]["anyOf"][0]["additionalProperties"]["anyOf"][-1]
        assert set(grammar["properties"]) == {"in", "gte", "gt", "lte", "lt"}
    assert "rerank" not in schemas["CaptionTextSearchRequest"]["properties"]
    for name in ("ImageSearchResponse", "CaptionSearchResponse"):
        fields = schemas[name]["properties"]
        assert fields["count"]["examples"] and fields["offset"]["examples"]
    metadata = schemas["ImageHit"]["properties"]["metadata"]
    assert metadata["examples"] and "filter" in metadata["description"]
    for path in ("/search/captions", "/search/similar-images"):
        operation = paths[path]["post"]
        query = {param["name"]: param for param in operation["parameters"]}
        assert {"k", "offset", "min_score", "filter"} <= set(query), path
        assert query["offset"]["schema"]["maximum"] == 49
        assert all(query[name]["schema"]["examples"] for name in ("offset", "filter")), path
        multipart = operation["requestBody"]["content"]["multipart/form-data"]
        assert {"image", "k", "offset", "min_score", "filter"} <= set(
            multipart["schema"]["properties"]
        )
        assert multipart["encoding"]["filter"]["contentType"] == "application/json"


def _refused_by_the_index(case: schemathesis.Case) -> bool:
    """Schema-valid requests that are 422 by design, for what JSON Schema cannot say: a filter
    naming fields the served index lacks (the fuzzed index has none) or filter text that is
    not JSON, and offset + k over the largest k. Only the "valid data is accepted" check is
    skipped for them; every other check (no 5xx, the error shape) still runs."""
    options: dict[str, Any] = {}
    for source in (case.query, case.body):
        if isinstance(source, dict):
            options.update(source)
    metadata_filter = options.get("filter")
    if metadata_filter not in (None, {}, "", "{}", "null"):
        return True
    try:
        return int(options.get("k", 10)) + int(options.get("offset", 0)) > 100
    except (TypeError, ValueError):
        return False


def _batches_encoded(app: Any, modality: str) -> float:
    metrics = app.state.service.metrics.render().decode()
    prefix = f'vld_batch_size_count{{modality="{modality}"}}'
    return float(next(row for row in metrics.splitlines() if row.startswith(prefix)).split()[-1])


@pytest.fixture(scope="module")
def fuzzed_paths(served_app: Any) -> Iterator[set[str]]:
    """The paths the fuzzer called; once it is done, check that its valid cases of the search
    endpoints it called were encoded, not just rejected."""
    paths: set[str] = set()
    yield paths
    for path, modality in (("/search/images", "text"), ("/search/captions", "image")):
        if path in paths:
            assert _batches_encoded(served_app, modality) >= 5, (path, modality)


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_schemathesis_finds_no_server_error_or_schema_violation(
    served_app: Any, fuzzed_paths: set[str], case: schemathesis.Case
) -> None:
    fuzzed_paths.add(case.path)
    headers = {"Authorization": f"Bearer {TOKEN}"} if case.path == "/admin/reload" else None
    excluded = [positive_data_acceptance] if _refused_by_the_index(case) else []
    case.call_and_validate(app=served_app, headers=headers, excluded_checks=excluded)
