"""POST /search/images and POST /search/captions: results, limits, and every bad input."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.service.conftest import ServiceEnv
from tests.service.helpers import FakeEncoder, assert_error, jpeg_bytes, png_bytes


@pytest.fixture
def client(shared_client: TestClient) -> TestClient:
    """The module's shared app: every test here leaves the service as it found it."""
    return shared_client


@pytest.fixture
def service_env(shared_env: ServiceEnv) -> ServiceEnv:
    return shared_env


def assert_still_serving(client: TestClient, env: ServiceEnv) -> None:
    response = client.post("/search/images", json={"text": env.gallery.captions[0][1], "k": 1})
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------------------- text → images
def test_text_query_finds_its_image_with_captions_and_url(
    client: TestClient, service_env: ServiceEnv
) -> None:
    gallery = service_env.gallery
    for i in (0, 3, 5):
        text = gallery.captions[2 * i][1]  # images are indexed by their first caption's vector
        response = client.post("/search/images", json={"text": f"  {text}\n", "k": 3})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["k"] == 3 and body["index_version"] == gallery.version
        assert body["took_ms"] >= 0
        assert [hit["rank"] for hit in body["results"]] == [1, 2, 3]
        best = body["results"][0]
        assert best["id"] == gallery.image_ids[i]
        assert best["score"] == pytest.approx(1.0, abs=1e-5)
        # No server file path in the response: the id and the url are what a client uses.
        assert "path" not in best
        assert str(service_env.images_dir.resolve()) not in response.text
        assert best["url"] == f"/images/{gallery.image_ids[i]}"
        assert best["captions"] == [c[1] for c in gallery.captions if c[2] == gallery.image_ids[i]]
        scores = [hit["score"] for hit in body["results"]]
        assert scores == sorted(scores, reverse=True)


def test_k_defaults_to_10_and_results_stop_at_the_gallery_size(
    client: TestClient, service_env: ServiceEnv
) -> None:
    body = client.post("/search/images", json={"text": "anything"}).json()
    assert body["k"] == 10
    assert len(body["results"]) == len(service_env.gallery.image_ids)  # 6 < 10: no -1 rows
    assert len({hit["id"] for hit in body["results"]}) == len(body["results"])


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"text": ""}, "text"),
        ({"text": "   \t\n "}, "text"),
        ({"text": "\u3000\u2003"}, "text"),  # unicode whitespace only
        ({"text": "x" * 1001}, "text"),
        ({"text": "a", "k": 0}, "k"),
        ({"text": "a", "k": 101}, "k"),
        ({"text": "a", "k": -5}, "k"),
        ({}, "text"),
        ({"k": 5}, "text"),
        ({"text": 42}, "text"),
        ({"text": ["a"]}, "text"),
        ({"text": None}, "text"),
        ({"text": "a", "k": "5"}, "k"),
        ({"text": "a", "k": 2.5}, "k"),
        ({"text": "a", "k": True}, "k"),
    ],
)
def test_bad_text_queries_are_422(
    client: TestClient, service_env: ServiceEnv, payload: dict, field: str
) -> None:
    error = assert_error(client.post("/search/images", json=payload), 422, "validation_error")
    assert any(detail["loc"][-1] == field for detail in error["details"]), error
    assert_still_serving(client, service_env)


def test_text_length_is_counted_after_trimming(client: TestClient) -> None:
    assert client.post("/search/images", json={"text": "  " + "x" * 1000 + "  "}).status_code == 200
    assert client.post("/search/images", json={"text": "é" * 1000}).status_code == 200


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'"text"', "application/json"),
        (b"", "application/json"),
        (b'{"text": "a"}', "text/plain"),
    ],
)
def test_malformed_json_bodies_are_422(
    client: TestClient, service_env: ServiceEnv, body: bytes, content_type: str
) -> None:
    response = client.post("/search/images", content=body, headers={"content-type": content_type})
    assert_error(response, 422, "validation_error")
    assert_still_serving(client, service_env)


def test_max_k_is_configurable_and_in_the_schema(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_k=3)
    assert client.post("/search/images", json={"text": "a", "k": 3}).status_code == 200
    assert_error(client.post("/search/images", json={"text": "a", "k": 4}), 422)
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TextSearchRequest"]
    assert schema["properties"]["k"]["maximum"] == 3
    assert schema["properties"]["k"]["default"] == 3


def test_lone_surrogates_do_not_break_the_encoder(client: TestClient) -> None:
    body = b'{"text": "caf\\ud800e", "k": 2}'
    response = client.post(
        "/search/images", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------------------- image → captions
@pytest.fixture
def gallery_picture(service_env: ServiceEnv) -> Iterator[Image.Image]:
    with Image.open(service_env.gallery.image_paths[2]) as image:
        yield image.convert("RGB")


def _caption_ids_of(env: ServiceEnv, image_index: int) -> set[str]:
    return {c[0] for c in env.gallery.captions if c[2] == env.gallery.image_ids[image_index]}


def test_multipart_image_query_finds_its_captions(
    client: TestClient, service_env: ServiceEnv, gallery_picture: Image.Image
) -> None:
    response = client.post(
        "/search/captions",
        files={"image": ("query.png", png_bytes(gallery_picture), "image/png")},
        data={"k": "2"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["k"] == 2 and body["index_version"] == service_env.gallery.version
    assert {hit["id"] for hit in body["results"]} == _caption_ids_of(service_env, 2)
    assert all(hit["image_id"] == service_env.gallery.image_ids[2] for hit in body["results"])
    assert body["results"][0]["caption"].startswith("img caption")
    assert body["results"][0]["rank"] == 1


@pytest.mark.parametrize(
    "content_type",
    ["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff"],
)
def test_raw_body_image_query_with_k_in_the_query_string(
    client: TestClient, service_env: ServiceEnv, gallery_picture: Image.Image, content_type: str
) -> None:
    # The declared type is only a gate: the content (a PNG here) is what gets sniffed.
    response = client.post(
        "/search/captions?k=2",
        content=png_bytes(gallery_picture),
        headers={"content-type": content_type},
    )
    assert response.status_code == 200, response.text
    assert {hit["id"] for hit in response.json()["results"]} == _caption_ids_of(service_env, 2)


def _mode_images() -> dict[str, bytes]:
    base = Image.new("RGB", (40, 30), (200, 40, 40))
    base.paste((20, 40, 220), (20, 0, 40, 30))
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = 0
    gradient = np.linspace(0, 65535, 40 * 30, dtype=np.uint16).reshape(30, 40)
    return {
        "1": png_bytes(base.convert("1")),
        "L": png_bytes(base.convert("L")),
        "P-transparency": png_bytes(palette, transparency=0),
        "RGBA": png_bytes(base.convert("RGBA")),
        "LA": png_bytes(base.convert("LA")),
        "CMYK-jpeg": jpeg_bytes(base.convert("CMYK"), quality=95),
        "I;16-png": png_bytes(Image.fromarray(gradient)),
        "gif": _save(base, "GIF"),
        "webp": _save(base, "WEBP"),
        "bmp": _save(base, "BMP"),
        "tiff": _save(base, "TIFF"),
        "mpo-like-jpeg": jpeg_bytes(base, quality=90),
    }


def _save(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


_MODE_KINDS = [
    "1",
    "L",
    "P-transparency",
    "RGBA",
    "LA",
    "CMYK-jpeg",
    "I;16-png",
    "gif",
    "webp",
    "bmp",
    "tiff",
    "mpo-like-jpeg",
]


@pytest.mark.parametrize("kind", _MODE_KINDS)
def test_every_mode_and_allowed_format_is_encoded(
    client: TestClient, service_env: ServiceEnv, kind: str
) -> None:
    data = _mode_images()[kind]
    if kind == "I;16-png":
        with Image.open(io.BytesIO(data)) as check:
            assert check.mode.startswith("I;16"), check.mode  # really a 16-bit PNG
    if kind == "CMYK-jpeg":
        with Image.open(io.BytesIO(data)) as check:
            assert check.mode == "CMYK"
    before = sum(service_env.encoder.image_batches)
    response = client.post("/search/captions", files={"image": ("x", data, "application/x-any")})
    assert response.status_code == 200, (kind, response.text)
    assert len(response.json()["results"]) == 10
    assert sum(service_env.encoder.image_batches) == before + 1  # it reached the encoder


def _bomb_png() -> bytes:
    # 8000 x 8000 = 64 Mpx declared, a few KB on disk: the header alone must get it refused.
    return png_bytes(Image.new("L", (8000, 8000), 0), optimize=True)


_SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b'<rect width="10" height="10" fill="red"/></svg>'
)
_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
_PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


@pytest.mark.parametrize(
    ("name", "data", "status", "code"),
    [
        ("random-bytes", np.random.default_rng(0).bytes(4096), 400, "not_an_image"),
        ("text", b"hello, I am not an image", 400, "not_an_image"),
        ("truncated-png", None, 400, "corrupt_image"),
        ("truncated-jpeg", None, 400, "corrupt_image"),
        ("svg", _SVG, 415, "unsupported_format"),
        ("svg-named-png", _SVG, 415, "unsupported_format"),
        ("eps", _EPS, 415, "unsupported_format"),
        ("pdf", _PDF, 415, "unsupported_format"),
        ("decompression-bomb", None, 413, "too_many_pixels"),
    ],
)
def test_bad_images_are_refused_with_the_right_status(
    client: TestClient,
    service_env: ServiceEnv,
    name: str,
    data: bytes | None,
    status: int,
    code: str,
) -> None:
    if name == "truncated-png":
        full = png_bytes(Image.effect_noise((64, 64), 40).convert("RGB"))
        data = full[: len(full) // 2]
    elif name == "truncated-jpeg":
        full = jpeg_bytes(Image.effect_noise((64, 64), 40).convert("RGB"))
        data = full[: len(full) // 2]
    elif name == "decompression-bomb":
        data = _bomb_png()
        assert len(data) < 200_000
    assert data is not None
    before = list(service_env.encoder.image_batches)
    filename = "picture.png" if name == "svg-named-png" else f"{name}.bin"
    multipart = client.post("/search/captions", files={"image": (filename, data, "image/png")})
    assert_error(multipart, status, code)
    raw = client.post("/search/captions", content=data, headers={"content-type": "image/png"})
    assert_error(raw, status, code)
    assert service_env.encoder.image_batches == before  # nothing reached the model
    assert_still_serving(client, service_env)


def test_pixel_limit_is_a_setting_and_holds_at_its_boundary(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_image_pixels=100)
    for size, status in (((10, 10), 200), ((100, 1), 200), ((101, 1), 413), ((11, 10), 413)):
        data = png_bytes(Image.new("RGB", size, "red"))
        response = client.post(
            "/search/captions", content=data, headers={"content-type": "image/png"}
        )
        assert response.status_code == status, (size, response.text)
        if status == 413:
            assert_error(response, 413, "too_many_pixels")


def test_a_large_upload_is_shrunk_before_it_is_queued(
    make_client: Callable[..., TestClient],
) -> None:
    from service.uploads import MAX_DECODED_SIDE

    class SizeRecorder(FakeEncoder):
        def __init__(self) -> None:
            super().__init__()
            self.sizes: list[tuple[int, int]] = []

        def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
            self.sizes.extend(image.size for image in images)
            return super().encode_images(images, batch_size)

    encoder = SizeRecorder()
    client = make_client(encoder=encoder)
    large = Image.new("RGB", (2400, 1600), "red")
    large.paste("blue", (0, 0, 1200, 800))
    small = Image.new("RGB", (300, 200), "red")
    for picture in (large, small):
        response = client.post(
            "/search/captions", content=png_bytes(picture), headers={"content-type": "image/png"}
        )
        assert response.status_code == 200, response.text
    assert encoder.sizes[-2:] == [(MAX_DECODED_SIDE, 683), (300, 200)]  # aspect ratio kept


def _chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        block = min(size, total - sent)
        sent += block
        yield b"\0" * block


def test_a_body_over_the_limit_is_413_with_content_length(
    client: TestClient, service_env: ServiceEnv
) -> None:
    data = b"\0" * (10 * 1024 * 1024 + 1)
    response = client.post("/search/captions", content=data, headers={"content-type": "image/png"})
    assert_error(response, 413, "payload_too_large")
    response = client.post("/search/captions", files={"image": ("big.png", data, "image/png")})
    assert_error(response, 413, "payload_too_large")
    assert_still_serving(client, service_env)


@pytest.mark.parametrize("transfer", ["content-length", "chunked"])
def test_a_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_413(
    make_client: Callable[..., TestClient], gallery_picture: Image.Image, transfer: str
) -> None:
    data = png_bytes(gallery_picture)
    client = make_client(max_upload_bytes=len(data))

    def post(body: bytes) -> httpx.Response:
        content = body if transfer == "content-length" else iter([body[:100], body[100:]])
        response = client.post(
            "/search/captions", content=content, headers={"content-type": "image/png"}
        )
        assert ("transfer-encoding" in response.request.headers) == (transfer == "chunked")
        return response

    at_limit = post(data)
    assert at_limit.status_code == 200, at_limit.text
    assert_error(post(data + b"\0"), 413, "payload_too_large")  # refused for its size alone


def test_a_chunked_body_over_the_limit_is_413_before_it_is_all_read(
    client: TestClient, service_env: ServiceEnv
) -> None:
    chunk = 256 * 1024
    total_chunks = 60  # 15 MiB offered, chunked (no Content-Length)
    pulled = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        more = pulled < total_chunks
        return {"type": "http.request", "body": b"\xff" * chunk, "more_body": more}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/search/captions",
        "raw_path": b"/search/captions",
        "root_path": "",
        "query_string": b"",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
        "headers": [(b"content-type", b"image/jpeg"), (b"transfer-encoding", b"chunked")],
    }
    assert client.portal is not None
    client.portal.call(client.app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    # Refused on the chunk that crossed 10 MiB: the remaining 5 MiB were never read.
    assert pulled == 10 * 1024 * 1024 // chunk + 1, pulled
    assert_still_serving(client, service_env)


def test_a_chunked_body_over_the_limit_is_413_through_the_client(
    client: TestClient, service_env: ServiceEnv
) -> None:
    response = client.post(
        "/search/captions",
        content=_chunks(10 * 1024 * 1024 + 1),
        headers={"content-type": "image/jpeg"},
    )
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert_error(response, 413, "payload_too_large")
    assert_still_serving(client, service_env)


def test_a_chunked_json_body_over_the_limit_is_413(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_upload_bytes=1000)
    payload = json.dumps({"text": "a " * 600}).encode()
    response = client.post(
        "/search/images",
        content=iter([payload[:500], payload[500:]]),
        headers={"content-type": "application/json"},
    )
    assert_error(response, 413, "payload_too_large")


@pytest.mark.parametrize(
    "content_type", ["application/json", "text/plain", "image/svg+xml", "application/pdf", ""]
)
def test_other_content_types_are_415(
    client: TestClient, gallery_picture: Image.Image, content_type: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/search/captions", content=png_bytes(gallery_picture), headers=headers)
    assert_error(response, 415, "unsupported_media_type")


def test_multipart_without_an_image_part_is_422(client: TestClient) -> None:
    response = client.post("/search/captions", data={"k": "3"}, files={"other": ("a", b"x")})
    error = assert_error(response, 422, "validation_error")
    assert error["details"][0]["loc"] == ["body", "image"]


def test_a_form_with_only_k_is_422_naming_the_image_part(client: TestClient) -> None:
    # Without a file a client encodes the form as application/x-www-form-urlencoded.
    response = client.post("/search/captions", data={"k": "3"})
    assert response.request.headers["content-type"] == "application/x-www-form-urlencoded"
    error = assert_error(response, 422, "validation_error")
    assert "'image'" in error["message"]
    assert error["details"][0]["loc"] == ["body", "image"]


def test_an_empty_image_is_422_as_the_schema_says(client: TestClient) -> None:
    multipart = client.post("/search/captions", files={"image": ("empty.png", b"", "image/png")})
    error = assert_error(multipart, 422, "validation_error")
    assert "'image' part is empty" in error["message"]
    assert error["details"][0]["type"] == "string_too_short"
    raw = client.post("/search/captions", content=b"", headers={"content-type": "image/png"})
    assert_error(raw, 422, "validation_error")
    body = client.get("/openapi.json").json()["paths"]["/search/captions"]["post"]["requestBody"]
    for media_type, content in body["content"].items():
        schema = content["schema"]
        image = schema["properties"]["image"] if media_type == "multipart/form-data" else schema
        assert image["minLength"] == 1, media_type


@pytest.mark.parametrize("k", ["0", "101", "abc", "2.5", "", " 3", "٣"])
def test_a_bad_multipart_k_is_422(client: TestClient, gallery_picture: Image.Image, k: str) -> None:
    response = client.post(
        "/search/captions",
        files={"image": ("q.png", png_bytes(gallery_picture), "image/png")},
        data={"k": k},
    )
    assert_error(response, 422, "validation_error")


@pytest.mark.parametrize("k", ["0", "101", "abc"])
def test_a_bad_query_k_is_422(client: TestClient, gallery_picture: Image.Image, k: str) -> None:
    response = client.post(
        f"/search/captions?k={k}",
        content=png_bytes(gallery_picture),
        headers={"content-type": "image/png"},
    )
    assert_error(response, 422, "validation_error")


def test_malformed_multipart_is_400(client: TestClient) -> None:
    response = client.post(
        "/search/captions",
        content=b"--xyz\r\nContent-Disposition: form-data\r\n\r\nno name\r\n--xyz--\r\n",
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert response.status_code in (400, 422), response.text
    assert_error(response, response.status_code)
    missing_boundary = client.post(
        "/search/captions", content=b"abc", headers={"content-type": "multipart/form-data"}
    )
    assert_error(missing_boundary, 400)


def test_wrong_method_and_unknown_path_use_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/search/images"), 405, "method_not_allowed")
    assert_error(client.get("/no/such/page"), 404, "not_found")
