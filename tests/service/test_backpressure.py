"""A full queue answers 503 + Retry-After at once: N admitted, k of N+k refused immediately."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from PIL import Image

from service.app import create_app
from service.routes import image_search as image_search_routes
from service.uploads import decode_upload
from tests.service.conftest import ServiceEnv
from tests.service.helpers import FakeEncoder, png_bytes

DELAY_S = 0.6


@pytest.mark.parametrize(("modality", "queue_size", "extra"), [("text", 4, 3), ("image", 3, 2)])
def test_queue_full_gives_exactly_k_immediate_503s(
    service_env: ServiceEnv,
    monkeypatch: pytest.MonkeyPatch,
    modality: str,
    queue_size: int,
    extra: int,
) -> None:
    decoded: list[int] = []

    def counting_decode(data: bytes, max_pixels: int) -> Image.Image:
        decoded.append(len(data))
        return decode_upload(data, max_pixels)

    monkeypatch.setattr(image_search_routes, "decode_upload", counting_decode)
    settings = service_env.settings(queue_size=queue_size, batch_window_ms=20, retry_after_s=3)
    slow_encoder = FakeEncoder(delay_s=DELAY_S)  # same vectors and fingerprint, slower
    app = create_app(settings, load_encoder=lambda s: slow_encoder)
    image = png_bytes(Image.new("RGB", (8, 8), "red"))

    async def scenario() -> list[tuple[httpx.Response, float]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

                async def one(i: int) -> tuple[httpx.Response, float]:
                    started = time.perf_counter()
                    if modality == "text":
                        response = await client.post("/search/images", json={"text": f"q {i}"})
                    else:
                        response = await client.post(
                            "/search/captions", content=image, headers={"content-type": "image/png"}
                        )
                    return response, time.perf_counter() - started

                outcomes = await asyncio.gather(*(one(i) for i in range(queue_size + extra)))
                # Once the queue drains, the service answers normally again.
                assert (
                    await client.post("/search/images", json={"text": "after"})
                ).status_code == 200
                metrics = (await client.get("/metrics")).text
                assert (
                    f'vld_rejected_queries_total{{modality="{modality}"}} {float(extra)}' in metrics
                )
                return outcomes

    outcomes = asyncio.run(scenario())
    statuses = [response.status_code for response, _ in outcomes]
    assert statuses.count(200) == queue_size, statuses
    assert statuses.count(503) == extra, statuses
    for response, elapsed in outcomes:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "3"
            assert response.json()["error"]["code"] == "overloaded"
            assert elapsed < DELAY_S / 2, elapsed  # refused at once, not after waiting
        else:
            assert elapsed >= DELAY_S  # these really waited for the slowed model
    # A refused upload is never decoded: the queue place is taken before decoding.
    assert len(decoded) == (queue_size if modality == "image" else 0)
