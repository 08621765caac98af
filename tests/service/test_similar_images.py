"""POST /search/similar-images ("more like this"): by gallery id (the stored vector, itself left
out) and by upload (the one upload path: its limits and errors, a copy of the query left out)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import ServiceEnv
from tests.service.helpers import (
    FakeEncoder,
    assert_error,
    gallery_metadata,
    publish_vectors,
)


@pytest.fixture
def client(shared_client: TestClient) -> TestClient:
    return shared_client


@pytest.fixture
def service_env(shared_env: ServiceEnv) -> ServiceEnv:
    return shared_env


def _similar(client: TestClient, **body: object) -> dict:
    response = client.post("/search/similar-images", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_similar_by_id_leaves_the_image_out_and_still_returns_k(
    client: TestClient, service_env: ServiceEnv
) -> None:
    ids = service_env.gallery.image_ids
    for query in (ids[0], ids[4]):
        body = _similar(client, id=query, k=5)
        found = [hit["id"] for hit in body["results"]]
        assert query not in found
        assert len(found) == 5 == body["count"] == len(set(found))  # all 5 others
        assert body["k"] == 5 and body["offset"] == 0 and body["reranked"] is False
        assert [hit["rank"] for hit in body["results"]] == [1, 2, 3, 4, 5]
        scores = [hit["score"] for hit in body["results"]]
        assert scores == sorted(scores, reverse=True)
        assert all(hit["score"] < 0.9999 for hit in body["results"])


def test_similar_by_id_ranks_by_the_stored_vectors_without_an_encoder_pass(
    client: TestClient, service_env: ServiceEnv
) -> None:
    from indexer.store import IndexVersion

    before = (list(service_env.encoder.text_batches), list(service_env.encoder.image_batches))
    body = _similar(client, id=service_env.gallery.image_ids[2], k=3)
    with IndexVersion.open(service_env.root) as index:
        vectors = index.reconstruct("images", range(index.image_count))  # (n, D)
    cosine = vectors @ vectors[2]
    expected = [i for i in np.argsort(-cosine) if i != 2][:3]
    assert [hit["id"] for hit in body["results"]] == [
        service_env.gallery.image_ids[i] for i in expected
    ]
    np.testing.assert_allclose([h["score"] for h in body["results"]], cosine[expected], atol=1e-5)
    after = (service_env.encoder.text_batches, service_env.encoder.image_batches)
    assert after == before  # no encoder pass


def test_similar_hits_carry_their_metadata(client: TestClient, service_env: ServiceEnv) -> None:
    body = _similar(client, id=service_env.gallery.image_ids[1], k=5)
    for hit in body["results"]:
        number = service_env.gallery.image_ids.index(hit["id"])
        assert hit["metadata"] == gallery_metadata(number)


def test_unknown_id_is_404_naming_it(client: TestClient) -> None:
    response = client.post("/search/similar-images", json={"id": "no/such image.png", "k": 3})
    error = assert_error(response, 404, "not_found")
    assert "'no/such image.png'" in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b"{}",  # no id
        b'{"id": ""}',
        b'{"id": 3}',
        b'{"id": "img0.png", "k": 0}',
        b'{"id": "img0.png", "k": "3"}',
    ],
)
def test_a_bad_json_body_is_422(client: TestClient, body: bytes) -> None:
    response = client.post(
        "/search/similar-images", content=body, headers={"content-type": "application/json"}
    )
    assert_error(response, 422, "validation_error")


# ---------------------------------------------------------------------------- upload form
@pytest.fixture(scope="module")
def image_vector_env(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TestClient, list[Path]]]:
    """A gallery indexed with the fake encoder's *image* vectors, so that an uploaded gallery
    picture is (up to float noise) its own gallery vector."""
    base = tmp_path_factory.mktemp("similar-uploads")
    encoder = FakeEncoder()
    colours = ["red", "orange", "yellow", "green", "teal", "blue", "purple", "pink"]
    paths, pictures = [], []
    for i, colour in enumerate(colours):
        picture = Image.new("RGB", (16, 16), colour)
        picture.paste("white", (0, 0, 4 + i, 6))
        path = base / f"{colour}.png"
        picture.save(path)
        paths.append(path)
        pictures.append(picture)
    publish_vectors(
        base / "index",
        fingerprint=encoder.fingerprint,
        image_ids=[p.name for p in paths],
        image_paths=paths,
        image_vectors=encoder.encode_images(pictures),
        captions=[("c0", "a caption", paths[0].name)],
        caption_vectors=encoder.encode_text(["a caption"]),
        image_metadata=[gallery_metadata(i) for i in range(len(paths))],
    )
    model_dir = base / "model"
    model_dir.mkdir()
    settings = Settings(
        model_dir=model_dir, index_root=base / "index", device="cpu", batch_window_ms=2.0
    )
    with TestClient(
        create_app(settings, load_encoder=lambda s: encoder), raise_server_exceptions=False
    ) as started:
        yield started, paths


def test_an_uploaded_gallery_picture_finds_others_not_itself(
    image_vector_env: tuple[TestClient, list[Path]],
) -> None:
    client, paths = image_vector_env
    query = paths[2]
    multipart = client.post(
        "/search/similar-images",
        files={"image": ("q.png", query.read_bytes(), "image/png")},
        data={"k": "4"},
    )
    raw = client.post(
        "/search/similar-images?k=4",
        content=query.read_bytes(),
        headers={"content-type": "image/png"},
    )
    for response in (multipart, raw):
        assert response.status_code == 200, response.text
        body = response.json()
        found = [hit["id"] for hit in body["results"]]
        assert query.name not in found and len(found) == 4 == body["count"]
    assert multipart.json()["results"] == raw.json()["results"]


def test_upload_options_come_from_parts_or_the_query_string(
    image_vector_env: tuple[TestClient, list[Path]],
) -> None:
    client, paths = image_vector_env
    data = paths[0].read_bytes()
    as_parts = client.post(
        "/search/similar-images",
        files={"image": ("q.png", data, "image/png")},
        data={"k": "2", "offset": "1", "filter": '{"even": true}'},
    )
    in_query = client.post(
        "/search/similar-images",
        params={"k": 2, "offset": 1, "filter": '{"even": true}'},
        content=data,
        headers={"content-type": "image/png"},
    )
    for response in (as_parts, in_query):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["offset"] == 1 and body["count"] == 2
        assert all(hit["metadata"]["even"] is True for hit in body["results"])
        assert paths[0].name not in [hit["id"] for hit in body["results"]]
    assert as_parts.json()["results"] == in_query.json()["results"]


def test_uploads_have_the_captions_endpoint_limits_and_errors(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_upload_bytes=2000)
    big = b"\0" * 2001
    assert_error(
        client.post("/search/similar-images", content=big, headers={"content-type": "image/png"}),
        413,
        "payload_too_large",
    )
    assert_error(
        client.post("/search/similar-images", files={"image": ("b.png", big, "image/png")}),
        413,
        "payload_too_large",
    )
    not_image = client.post(
        "/search/similar-images", content=b"hello", headers={"content-type": "image/png"}
    )
    assert_error(not_image, 400, "not_an_image")
    assert_error(
        client.post("/search/similar-images", content=b"x", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    missing = client.post("/search/similar-images", data={"k": "3"})
    assert assert_error(missing, 422)["details"][0]["loc"] == ["body", "image"]
