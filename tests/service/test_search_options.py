"""The options every search takes: a metadata ``filter`` (inside the search), ``min_score``,
``offset`` paging, the ``count`` of results; and POST /search/captions-by-text."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import ServiceEnv
from tests.service.helpers import assert_error, gallery_metadata

# The shared gallery: 6 images, colour red/green/blue = i % 3, number = i, even, tags.
KNOWN_FIELDS = ["colour", "even", "number", "tags"]


@pytest.fixture
def client(shared_client: TestClient) -> TestClient:
    return shared_client


@pytest.fixture
def service_env(shared_env: ServiceEnv) -> ServiceEnv:
    return shared_env


def _caption_of(env: ServiceEnv, i: int) -> str:
    return env.gallery.captions[2 * i][1]  # image i is indexed by its first caption's vector


def _picture(env: ServiceEnv, i: int) -> bytes:
    return env.gallery.image_paths[i].read_bytes()


def search(client: TestClient, env: ServiceEnv, endpoint: str, **options: Any) -> httpx.Response:
    """One query to ``endpoint`` with ``options`` where that endpoint takes them (JSON body
    fields; query parameters for an upload, the filter as JSON text)."""
    if endpoint in ("images", "captions-by-text"):
        return client.post(f"/search/{endpoint}", json={"text": _caption_of(env, 1), **options})
    if endpoint == "similar-by-id":
        body = {"id": env.gallery.image_ids[1], **options}
        return client.post("/search/similar-images", json=body)
    params = {
        name: json_text(value) if name == "filter" else value for name, value in options.items()
    }
    path = "/search/captions" if endpoint == "captions" else "/search/similar-images"
    return client.post(
        path, params=params, content=_picture(env, 1), headers={"content-type": "image/png"}
    )


def json_text(value: Any) -> str:
    return json.dumps(value)


ENDPOINTS = ["images", "captions-by-text", "captions", "similar-by-id", "similar-upload"]


def _metadata_of_hits(env: ServiceEnv, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Each hit's image metadata (a caption's: its image's), from the gallery's own list."""
    ids = env.gallery.image_ids
    return [
        gallery_metadata(ids.index(hit["image_id"] if "image_id" in hit else hit["id"]))
        for hit in body["results"]
    ]


# ---------------------------------------------------------------------------- filter
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_endpoint_applies_a_filter(
    client: TestClient, service_env: ServiceEnv, endpoint: str
) -> None:
    unfiltered = search(client, service_env, endpoint, k=12).json()
    assert {m["colour"] for m in _metadata_of_hits(service_env, unfiltered)} != {"blue"}
    response = search(client, service_env, endpoint, k=12, filter={"colour": "blue"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["results"] and body["count"] == len(body["results"]) <= 12
    assert all(m["colour"] == "blue" for m in _metadata_of_hits(service_env, body))
    if "metadata" in body["results"][0]:
        assert all(hit["metadata"]["colour"] == "blue" for hit in body["results"])


@pytest.mark.parametrize(
    ("metadata_filter", "expected"),
    [
        ({"colour": "red"}, {0, 3}),
        ({"colour": {"in": ["red", "blue"]}}, {0, 2, 3, 5}),
        ({"number": {"gte": 2, "lt": 5}}, {2, 3, 4}),
        ({"number": {"gt": 3}}, {4, 5}),
        ({"even": False}, {1, 3, 5}),
        ({"tags": "pair"}, {2, 4}),  # a list field: contains
        ({"colour": "green", "even": True}, {4}),  # ANDed
        ({"colour": "purple"}, set()),
        ({}, {0, 1, 2, 3, 4, 5}),  # no filter
    ],
)
def test_a_filter_selects_exactly_the_matching_images(
    client: TestClient,
    service_env: ServiceEnv,
    metadata_filter: dict[str, Any],
    expected: set[int],
) -> None:
    response = search(client, service_env, "images", k=6, filter=metadata_filter)
    assert response.status_code == 200, response.text
    found = {service_env.gallery.image_ids.index(hit["id"]) for hit in response.json()["results"]}
    assert found == expected


def test_a_selective_filter_still_returns_k_when_k_match(
    client: TestClient, service_env: ServiceEnv
) -> None:
    # The query is image 1's caption: unfiltered, its top 2 hold image 1 (green). Red images
    # 0 and 3 must still both come back — the filter is applied inside the search, not to a
    # fixed top-k afterwards.
    response = search(client, service_env, "images", k=2, filter={"colour": "red"})
    body = response.json()
    assert body["count"] == 2
    assert {hit["id"] for hit in body["results"]} == {
        service_env.gallery.image_ids[0],
        service_env.gallery.image_ids[3],
    }


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_an_unknown_filter_field_is_422_naming_it_and_the_known_ones(
    client: TestClient, service_env: ServiceEnv, endpoint: str
) -> None:
    response = search(client, service_env, endpoint, k=3, filter={"album": "2024"})
    error = assert_error(response, 422, "invalid_filter")
    assert "album" in error["message"]
    assert all(name in error["message"] for name in KNOWN_FIELDS), error["message"]
    assert error["details"][0]["loc"] == ["filter", "album"]
    assert error["details"][0]["known_fields"] == KNOWN_FIELDS


@pytest.mark.parametrize(
    "metadata_filter",
    [
        {"number": {"near": 3}},  # no such operator
        {"colour": {"gte": 2}},  # a range on a string field
        {"number": {"in": []}},  # "in" nothing
    ],
)
def test_a_misused_filter_is_422_naming_the_field(
    client: TestClient, service_env: ServiceEnv, metadata_filter: dict[str, Any]
) -> None:
    response = search(client, service_env, "images", k=3, filter=metadata_filter)
    error = assert_error(response, 422)
    assert next(iter(metadata_filter)) in error["message"]


@pytest.mark.parametrize("metadata_filter", ["colour=red", ["colour"], 3])
def test_a_filter_that_is_not_an_object_is_422(
    client: TestClient, service_env: ServiceEnv, metadata_filter: Any
) -> None:
    response = search(client, service_env, "images", k=3, filter=metadata_filter)
    error = assert_error(response, 422, "validation_error")
    assert error["details"][0]["loc"][:2] == ["body", "filter"]


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"red"', '{"colour": '])
def test_a_malformed_filter_as_text_is_422(
    client: TestClient, service_env: ServiceEnv, text: str
) -> None:
    data = _picture(service_env, 1)
    in_query = client.post(
        "/search/captions",
        params={"filter": text},
        content=data,
        headers={"content-type": "image/png"},
    )
    error = assert_error(in_query, 422, "validation_error")
    assert error["details"][0]["loc"] == ["query", "filter"]
    as_part = client.post(
        "/search/similar-images",
        files={"image": ("q.png", data, "image/png")},
        data={"filter": text},
    )
    error = assert_error(as_part, 422, "validation_error")
    assert error["details"][0]["loc"] == ["body", "filter"]
    assert "filter" in error["message"]


HUGE = 10**400  # an int no float (so no stored number) can hold


@pytest.mark.parametrize(
    "metadata_filter",
    [{"number": HUGE}, {"number": {"in": [1, HUGE]}}, {"number": {"gte": HUGE}}],
    ids=["equality", "in", "gte"],
)
@pytest.mark.parametrize("endpoint", ["images", "similar-by-id", "similar-upload"])
def test_a_filter_number_beyond_the_float_range_is_422_naming_the_field(
    client: TestClient, service_env: ServiceEnv, endpoint: str, metadata_filter: dict[str, Any]
) -> None:
    response = search(client, service_env, endpoint, k=3, filter=metadata_filter)
    error = assert_error(response, 422, "invalid_filter")
    assert error["details"][0]["loc"] == ["filter", "number"]
    assert "'number'" in error["message"] and "401 digits" in error["message"]


@pytest.mark.parametrize(
    "filter_json",
    ['{"colour": "\\ud800"}', '{"colour": {"in": ["red", "\\ud800"]}}', '{"\\ud800": "a"}'],
    ids=["value", "in", "field name"],
)
def test_a_filter_with_a_lone_surrogate_is_422(
    client: TestClient, service_env: ServiceEnv, filter_json: str
) -> None:
    """JSON escapes can spell text that is not UTF-8; sqlite cannot bind it, nor can the
    error be written with it."""
    for response in (
        client.post(
            "/search/images",
            content=f'{{"text": "a", "k": 3, "filter": {filter_json}}}',
            headers={"content-type": "application/json"},
        ),
        client.post(
            "/search/similar-images",
            params={"filter": filter_json},
            content=_picture(service_env, 1),
            headers={"content-type": "image/png"},
        ),
    ):
        error = assert_error(response, 422, "invalid_filter")
        assert "UTF-8" in error["message"] and "\\ud800" in error["message"]
        response.content.decode("utf-8")  # strict: the body is UTF-8 itself


def test_an_error_naming_a_lone_surrogate_is_still_rendered() -> None:
    from service.errors import error_response

    response = error_response(
        422, "invalid_filter", "bad \ud800", details=[{"loc": ["filter", "\ud800"]}]
    )
    body = json.loads(response.body.decode("utf-8"))
    assert body["error"]["message"] == "bad \\ud800"
    assert body["error"]["details"][0]["loc"] == ["filter", "\\ud800"]


@pytest.mark.parametrize(
    "text",
    ["[" * 4000 + "]" * 4000, '{"colour": {"in": ' + "[" * 4000 + "]" * 4000 + "}}"],
    ids=["array", "in an object"],
)
def test_a_deeply_nested_filter_as_text_is_422(
    client: TestClient, service_env: ServiceEnv, text: str
) -> None:
    data = _picture(service_env, 1)
    in_query = client.post(
        "/search/similar-images",
        params={"filter": text},
        content=data,
        headers={"content-type": "image/png"},
    )
    error = assert_error(in_query, 422, "validation_error")
    assert error["details"][0]["loc"] == ["query", "filter"]
    assert "nested too deeply" in error["message"]
    as_part = client.post(
        "/search/captions",
        files={"image": ("q.png", data, "image/png")},
        data={"filter": text},
    )
    error = assert_error(as_part, 422, "validation_error")
    assert error["details"][0]["loc"] == ["body", "filter"]
    assert "nested too deeply" in error["message"]


def test_a_filter_as_text_is_at_most_8192_characters(
    client: TestClient, service_env: ServiceEnv
) -> None:
    values = json.dumps([f"colour-{i}" for i in range(1000)])  # ~12 KB: over the limit
    response = client.post(
        "/search/captions",
        params={"filter": f'{{"colour": {{"in": {values}}}}}'},
        content=_picture(service_env, 1),
        headers={"content-type": "image/png"},
    )
    error = assert_error(response, 422, "validation_error")
    assert error["details"][0] == {
        "loc": ["query", "filter"],
        "msg": error["message"],
        "type": "too_long",
    }
    assert "at most 8192" in error["message"]


# ---------------------------------------------------------------------------- min_score, offset
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_min_score_drops_results_below_it(
    client: TestClient, service_env: ServiceEnv, endpoint: str
) -> None:
    every = search(client, service_env, endpoint, k=12).json()["results"]
    scores = sorted(hit["retrieval_score"] for hit in every)
    threshold = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2  # a median cut
    body = search(client, service_env, endpoint, k=12, min_score=threshold).json()
    assert body["count"] == len(body["results"]) == len([s for s in scores if s >= threshold])
    assert 0 < body["count"] < len(every)
    assert all(hit["retrieval_score"] >= threshold for hit in body["results"])


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_offset_pages_through_the_results(
    client: TestClient, service_env: ServiceEnv, endpoint: str
) -> None:
    first_four = search(client, service_env, endpoint, k=4).json()
    page_two = search(client, service_env, endpoint, k=2, offset=2).json()
    assert page_two["offset"] == 2 and page_two["k"] == 2 and page_two["count"] == 2
    assert page_two["results"] == first_four["results"][2:4]
    assert [hit["rank"] for hit in page_two["results"]] == [3, 4]


def test_an_offset_past_the_results_returns_none(
    client: TestClient, service_env: ServiceEnv
) -> None:
    body = search(client, service_env, "images", k=5, offset=10).json()
    assert body["results"] == [] and body["count"] == 0 and body["offset"] == 10


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_offset_plus_k_over_max_k_is_422(
    client: TestClient, service_env: ServiceEnv, endpoint: str
) -> None:
    error = assert_error(search(client, service_env, endpoint, k=95, offset=10), 422)
    assert "offset + k must be at most 100" in error["message"]
    assert "95" in error["message"] and "10" in error["message"]


@pytest.mark.parametrize(
    "options",
    [{"offset": -1}, {"offset": 100}, {"min_score": 1.5}, {"min_score": "high"}, {"k": 0}],
)
@pytest.mark.parametrize("endpoint", ["images", "captions"])
def test_out_of_range_options_are_422(
    client: TestClient, service_env: ServiceEnv, endpoint: str, options: dict[str, Any]
) -> None:
    response = search(client, service_env, endpoint, **options)
    error = assert_error(response, 422, "validation_error")
    assert error["details"][0]["loc"][-1] == next(iter(options))


def test_multipart_option_parts_are_checked(client: TestClient, service_env: ServiceEnv) -> None:
    data = _picture(service_env, 1)
    for part, value in (("offset", "-1"), ("offset", "x"), ("min_score", "2"), ("min_score", "")):
        response = client.post(
            "/search/captions", files={"image": ("q.png", data, "image/png")}, data={part: value}
        )
        error = assert_error(response, 422, "validation_error")
        assert error["details"][0]["loc"] == ["body", part], (part, value)


# ---------------------------------------------------------------------------- text → captions
def test_captions_by_text_finds_the_nearest_captions(
    client: TestClient, service_env: ServiceEnv
) -> None:
    from indexer.store import IndexVersion

    text = "img caption 1 of picture 4"
    response = client.post("/search/captions-by-text", json={"text": text, "k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["k"] == 3 and body["count"] == 3 and body["reranked"] is False
    assert [hit["rank"] for hit in body["results"]] == [1, 2, 3]
    with IndexVersion.open(service_env.root) as index:
        scores, rows = index.search_captions(service_env.encoder.text_vector(text)[None], 3)
        expected = [record.id for record in index.caption_records(rows[0])]
    assert [hit["id"] for hit in body["results"]] == expected
    assert [hit["score"] for hit in body["results"]] == pytest.approx(list(scores[0]), abs=1e-5)
    known = {c[0]: (c[1], c[2]) for c in service_env.gallery.captions}
    for hit in body["results"]:
        assert (hit["caption"], hit["image_id"]) == known[hit["id"]]


@pytest.mark.parametrize("payload", [{"text": ""}, {"text": "a", "k": 101}, {"k": 3}])
def test_captions_by_text_validates_like_the_image_search(
    client: TestClient, payload: dict[str, Any]
) -> None:
    assert_error(client.post("/search/captions-by-text", json=payload), 422, "validation_error")


def test_captions_by_text_needs_a_caption_index(
    make_client: Callable[..., TestClient], service_env: ServiceEnv, tmp_path: Path
) -> None:
    from indexer import publish

    encoder = service_env.encoder
    root = tmp_path / "images-only"
    image = publish.ImageRow(0, "a.png", str(service_env.gallery.image_paths[0]), ())
    publish.publish_vectors(
        root,
        fingerprint=encoder.fingerprint,
        image_rows=[image],
        image_vectors=encoder.encode_text(["a"]),
        index="flat",
    )
    client = make_client(index_root=root)
    assert client.post("/search/images", json={"text": "a"}).status_code == 200
    response = client.post("/search/captions-by-text", json={"text": "a"})
    assert_error(response, 404, "modality_missing")
