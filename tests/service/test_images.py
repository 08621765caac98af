"""GET /images/{id}: the listed file, and nothing but listed files."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import ServiceEnv
from tests.service.helpers import assert_error


def test_a_listed_image_is_served_with_its_bytes(
    client: TestClient, service_env: ServiceEnv
) -> None:
    gallery = service_env.gallery
    response = client.get(f"/images/{gallery.image_ids[1]}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == gallery.image_paths[1].read_bytes()


def test_search_result_urls_resolve(client: TestClient) -> None:
    body = client.post("/search/images", json={"text": "a query", "k": 3}).json()
    assert body["results"]
    for hit in body["results"]:
        response = client.get(hit["url"])
        assert response.status_code == 200
        assert response.content[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "path",
    [
        "/images/nope.png",
        "/images/..%2F..%2F..%2Fetc%2Fpasswd",
        "/images/%2Fetc%2Fpasswd",
        "/images//etc/passwd",
        "/images/img1.png%2F..%2Fimg2.png",
        "/images/img1.png%00.png",
        "/images/",
    ],
)
def test_unlisted_ids_and_traversal_attempts_are_404(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404, (path, response.status_code, response.content[:100])
    assert_error(response, 404)
    assert b"root:" not in response.content


def _raw_get(client: TestClient, raw_path: str) -> tuple[int, bytes]:
    """GET ``raw_path`` exactly as a client sent it: httpx would remove the ``..`` segments
    before the app saw them, an HTTP server (uvicorn) does not."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": raw_path, "raw_path": raw_path.encode(), "root_path": "",
        "query_string": b"", "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 5000), "server": ("testserver", 80), "state": {},
    }  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    assert client.portal is not None  # the client was started (its lifespan ran)
    client.portal.call(client.app, scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize(
    "raw_path", ["/images/../../../../etc/passwd", "/images/img1.png/../../../etc/passwd"]
)
def test_dot_segments_sent_raw_are_404(client: TestClient, raw_path: str) -> None:
    status, body = _raw_get(client, raw_path)
    assert status == 404, (raw_path, body[:200])
    assert b"root:" not in body and b'"not_found"' in body
    # The dot segments reached the route as part of the id (looked up, never joined on a path).
    assert raw_path.removeprefix("/images/").encode() in body, body


def test_a_sibling_file_next_to_the_gallery_is_not_served(
    client: TestClient, service_env: ServiceEnv
) -> None:
    secret = service_env.images_dir / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    assert_error(client.get("/images/secret.png"), 404, "not_found")


def test_a_listed_file_that_vanished_is_404(client: TestClient, service_env: ServiceEnv) -> None:
    service_env.gallery.image_paths[0].unlink()
    error = assert_error(client.get(f"/images/{service_env.gallery.image_ids[0]}"), 404)
    assert "missing" in error["message"]
