"""One bad query never fails its neighbours, and no 5xx leaves a keep-alive client stranded.

Issue 10: a banner image (wider than ~6.6:1) used to make the model's preprocessing raise
inside the encoding batch, failing every query that shared the batch, and the 500 dropped the
keep-alive connection without saying so.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from indexer.store import IndexVersion
from model.images import ImageError
from service.app import create_app
from tests.service.conftest import ServiceEnv, TinyModelEnv
from tests.service.helpers import FakeEncoder, assert_error, png_bytes

POISON_SIZE = (13, 7)  # the one image size the poisoned encoder cannot encode


class PoisonedEncoder(FakeEncoder):
    """The fake encoder, except that a batch holding a ``POISON_SIZE`` image raises."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.poisoned_batches: list[int] = []  # sizes of the batches that raised

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        if any(image.size == POISON_SIZE for image in images):
            self.poisoned_batches.append(len(images))
            raise self.error
        return super().encode_images(images, batch_size)


def _caption_ids_of(env: ServiceEnv, image_index: int) -> set[str]:
    return {c[0] for c in env.gallery.captions if c[2] == env.gallery.image_ids[image_index]}


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (RuntimeError("CUDA error: an illegal memory access"), 500, "encode_failed"),
        (ImageError("the processor cannot use this image"), 400, "invalid_image"),
    ],
)
def test_a_poisoned_batch_answers_every_good_query(
    service_env: ServiceEnv, error: Exception, status: int, code: str
) -> None:
    """8 concurrent image queries, one poisoned: the 7 good get their captions, the bad one
    its own error in the service's error shape."""
    encoder = PoisonedEncoder(error)
    # A long quiet window so the 8 uploads, decoded one by one, still meet in one batch.
    settings = service_env.settings(max_batch_size=8, batch_window_ms=300, batch_max_wait_ms=3000)
    app = create_app(settings, load_encoder=lambda s: encoder)
    good = [service_env.gallery.image_paths[i % 6].read_bytes() for i in range(7)]
    uploads = [*good[:3], png_bytes(Image.new("RGB", POISON_SIZE, "red")), *good[3:]]

    async def scenario() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            "/search/captions?k=2",
                            content=data,
                            headers={"content-type": "image/png"},
                        )
                        for data in uploads
                    )
                )

    responses = asyncio.run(scenario())
    assert max(encoder.poisoned_batches) > 1, encoder.poisoned_batches  # a real shared batch
    bad = assert_error(responses[3], status, code)
    assert bad["message"]
    good_responses = responses[:3] + responses[4:]
    for i, response in enumerate(good_responses):
        assert response.status_code == 200, response.text
        found = {hit["id"] for hit in response.json()["results"]}
        assert found == _caption_ids_of(service_env, i % 6)


@pytest.mark.parametrize("size", [(700, 100), (256, 10), (1, 300), (300, 1), (1, 1)])
def test_any_aspect_ratio_is_searchable_with_the_real_model(
    tiny_model_env: TinyModelEnv, size: tuple[int, int]
) -> None:
    """The tiny ViLT's processor alone rounds the short side of these to 0 pixels."""
    model = tiny_model_env.model
    app = create_app(tiny_model_env.settings(), load_encoder=lambda s: model)
    picture = Image.new("RGB", size, (200, 30, 40))
    picture.paste((20, 40, 220), (0, 0, max(1, size[0] // 2), max(1, size[1] // 2)))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(
            "/search/captions?k=3",
            content=png_bytes(picture),
            headers={"content-type": "image/png"},
        )
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 3


# ------------------------------------------------------------------ keep-alive after a 5xx
@contextmanager
def _keep_alive_client(app: FastAPI) -> Iterator[http.client.HTTPConnection]:
    """``app`` behind a real uvicorn on a loopback port (in a thread), and a keep-alive
    HTTP/1.1 connection to it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    connection = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=10)
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield connection
    finally:
        connection.close()
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def _post_image(
    connection: http.client.HTTPConnection, data: bytes
) -> tuple[http.client.HTTPResponse, dict[str, Any]]:
    connection.request(
        "POST", "/search/captions?k=2", body=data, headers={"Content-Type": "image/png"}
    )
    response = connection.getresponse()
    return response, json.loads(response.read())


def test_an_encode_failure_is_a_5xx_that_keeps_the_connection_usable(
    service_env: ServiceEnv,
) -> None:
    encoder = PoisonedEncoder(RuntimeError("the encoder broke on this input"))
    app = create_app(service_env.settings(), load_encoder=lambda s: encoder)
    poison = png_bytes(Image.new("RGB", POISON_SIZE, "red"))
    good = service_env.gallery.image_paths[1].read_bytes()
    with _keep_alive_client(app) as connection:
        failed, error = _post_image(connection, poison)
        assert failed.status == 500 and error["error"]["code"] == "encode_failed"
        assert (failed.getheader("connection") or "").lower() != "close"
        kept = connection.sock
        assert kept is not None  # http.client keeps the socket: the server said nothing
        answered, found = _post_image(connection, good)  # on the same connection
        assert answered.status == 200 and found["results"]
        assert connection.sock is kept


def test_an_unhandled_5xx_says_connection_close_so_the_next_request_reconnects(
    service_env: ServiceEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected failure (here in the index search) is re-raised to the server, which
    drops the connection: the response must say ``Connection: close``, or the client's next
    request on that connection gets an empty reply (http.client: RemoteDisconnected)."""
    original = IndexVersion.search_captions
    broken = {"on": True}

    def search_captions(
        index: IndexVersion, xq: np.ndarray, k: int, **options: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        if broken["on"]:
            raise OSError("the index file went away")
        return original(index, xq, k, **options)

    monkeypatch.setattr(IndexVersion, "search_captions", search_captions)
    app = create_app(service_env.settings(), load_encoder=lambda s: service_env.encoder)
    picture = service_env.gallery.image_paths[1].read_bytes()
    with _keep_alive_client(app) as connection:
        failed, error = _post_image(connection, picture)
        assert failed.status == 500 and error["error"]["code"] == "internal_error"
        assert failed.getheader("connection", "").lower() == "close"
        broken["on"] = False
        answered, found = _post_image(connection, picture)  # http.client reconnected
        assert answered.status == 200 and found["results"]
