"""Re-ranking with the early-interaction teacher: scores, flags, bounds, a failed teacher, the cache."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.store import CaptionRecord
from service.rerank import PixelCache, rerank_order
from service.retrieval import Scored
from service.settings import SettingsError, load_settings
from tests.service.conftest import ServiceEnv
from tests.service.helpers import assert_error, png_bytes

TEXT = "img caption 0 of picture 3"


def _query_png(service_env: ServiceEnv) -> bytes:
    return png_bytes(Image.open(service_env.gallery.image_paths[2]))


def _search_images(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/search/images", json={"text": TEXT, "k": 6, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


def _search_captions(client: TestClient, png: bytes, **params: Any) -> dict[str, Any]:
    response = client.post(
        "/search/captions",
        params={"k": 12, **params},
        content=png,
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def _assert_reranked(plain: dict[str, Any], reranked: dict[str, Any]) -> None:
    assert plain["reranked"] is False and reranked["reranked"] is True
    for hit in plain["results"]:
        assert hit["score"] == hit["retrieval_score"]
    cosine = {hit["id"]: hit["retrieval_score"] for hit in plain["results"]}
    assert {hit["id"]: hit["retrieval_score"] for hit in reranked["results"]} == pytest.approx(
        cosine
    )
    scores = [hit["score"] for hit in reranked["results"]]
    assert scores == sorted(scores, reverse=True)  # ordered by the teacher's logit
    assert all(hit["score"] != hit["retrieval_score"] for hit in reranked["results"])
    assert [hit["rank"] for hit in reranked["results"]] == list(
        range(1, len(reranked["results"]) + 1)
    )


@pytest.fixture
def teacher_client(make_client: Callable[..., TestClient], tiny_vilt_dir: Path) -> TestClient:
    return make_client(teacher_dir=tiny_vilt_dir)


def test_readyz_names_the_loaded_teacher(teacher_client: TestClient, tiny_vilt_dir: Path) -> None:
    ready = teacher_client.get("/readyz").json()
    weights = (tiny_vilt_dir / "model.safetensors").read_bytes()
    assert ready["rerank_available"] is True
    assert ready["teacher_fingerprint"] == hashlib.sha256(weights).hexdigest()
    assert ready["rerank_problem"] is None


def test_text_rerank_changes_score_and_keeps_retrieval_score(teacher_client: TestClient) -> None:
    plain = _search_images(teacher_client)
    assert plain == {**_search_images(teacher_client, rerank=False), "took_ms": plain["took_ms"]}
    _assert_reranked(plain, _search_images(teacher_client, rerank=True))


def test_image_rerank_changes_score_and_keeps_retrieval_score(
    teacher_client: TestClient, service_env: ServiceEnv
) -> None:
    png = _query_png(service_env)
    plain = _search_captions(teacher_client, png)
    _assert_reranked(plain, _search_captions(teacher_client, png, rerank="true"))
    metrics = teacher_client.get("/metrics").text
    assert 'vld_rerank_seconds_count{modality="image"} 1.0' in metrics


def test_only_the_shortlist_is_reranked(teacher_client: TestClient) -> None:
    plain = _search_images(teacher_client)
    reranked = _search_images(teacher_client, rerank=True, rerank_k=2)
    assert {h["id"] for h in reranked["results"][:2]} == {h["id"] for h in plain["results"][:2]}
    assert reranked["results"][2:] == plain["results"][2:]  # the rest in retrieval order


def test_rerank_default_applies_when_the_request_does_not_say(
    make_client: Callable[..., TestClient], tiny_vilt_dir: Path
) -> None:
    client = make_client(teacher_dir=tiny_vilt_dir, rerank_default=True)
    assert _search_images(client)["reranked"] is True
    assert _search_images(client, rerank=False)["reranked"] is False


@pytest.mark.parametrize("rerank_k", [0, 101, 20.5, "20"])
def test_rerank_k_out_of_bounds_is_422(teacher_client: TestClient, rerank_k: Any) -> None:
    response = teacher_client.post(
        "/search/images", json={"text": TEXT, "rerank": True, "rerank_k": rerank_k}
    )
    assert_error(response, 422)


def test_rerank_k_bounds_on_captions(teacher_client: TestClient, service_env: ServiceEnv) -> None:
    png, headers = _query_png(service_env), {"content-type": "image/png"}
    for bad in ("0", "101"):
        response = teacher_client.post(
            "/search/captions", params={"rerank": "true", "rerank_k": bad}, content=png,
            headers=headers,
        )  # fmt: skip
        assert_error(response, 422)
    assert _search_captions(teacher_client, png, rerank="true", rerank_k=100)["reranked"]
    assert _search_images(teacher_client, rerank=True, rerank_k=100)["reranked"]


@pytest.mark.parametrize("kind", ["missing", "no-retrieval-head"])
def test_a_teacher_that_fails_to_load_leaves_the_service_serving_without_rerank(
    make_client: Callable[..., TestClient],
    tmp_path: Path,
    service_env: ServiceEnv,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from model.testing import make_tiny_vilt

    teacher_dir = tmp_path / "teacher"
    if kind == "no-retrieval-head":
        make_tiny_vilt(teacher_dir, retrieval_head=False)
    client = make_client(teacher_dir=teacher_dir)
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["rerank_available"] is False
    assert ready.json()["teacher_fingerprint"] is None
    problem = ready.json()["rerank_problem"]
    assert "teacher" in problem and str(tmp_path) not in problem  # no server paths in /readyz
    assert "serving WITHOUT re-ranking" in caplog.text and str(teacher_dir) in caplog.text
    answer = _search_images(client, rerank=True)
    assert answer["reranked"] is False and answer["results"]
    assert all(hit["score"] == hit["retrieval_score"] for hit in answer["results"])
    captions = _search_captions(client, _query_png(service_env), rerank="true")
    assert captions["reranked"] is False and captions["results"]


def test_the_pixel_cache_is_bounded(
    make_client: Callable[..., TestClient], tiny_vilt_dir: Path
) -> None:
    client = make_client(teacher_dir=tiny_vilt_dir, rerank_cache_size=2)
    assert _search_images(client, rerank=True)["reranked"]
    reranker = client.app.state.service.reranker  # type: ignore[attr-defined]
    assert len(reranker.pixels) == 2

    cache = PixelCache(2)
    for key in "abc":
        cache.put(key, np.zeros((3, 1, 1), dtype=np.float32))
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") is not None
    with pytest.raises(ValueError, match="at least 1"):
        PixelCache(0)
    # Bounded in bytes too: three 4 KiB entries under a 10 KiB budget keep two.
    small = PixelCache(100, max_bytes=10 * 1024)
    for key in "abc":
        small.put(key, np.zeros((3, 16, 21), dtype=np.float32))  # 4,032 bytes
    assert len(small) == 2 and small.nbytes <= 10 * 1024 and small.get("a") is None


def test_a_gallery_file_rewritten_in_place_is_read_again(
    teacher_client: TestClient, tmp_path: Path
) -> None:
    import os

    from PIL import Image

    reranker = teacher_client.app.state.service.reranker  # type: ignore[attr-defined]
    path = tmp_path / "g.png"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(path)
    red = reranker.gallery_pixels(str(path))
    Image.new("RGB", (40, 40), (0, 0, 255)).save(path)
    os.utime(path, ns=(1, 1))  # a new mtime even on a coarse clock
    blue = reranker.gallery_pixels(str(path))
    assert red is not None and blue is not None and not np.array_equal(red, blue)
    assert reranker.gallery_pixels(str(tmp_path / "gone.png")) is None


def test_a_full_rerank_queue_answers_in_retrieval_order(teacher_client: TestClient) -> None:
    reranker = teacher_client.app.state.service.reranker  # type: ignore[attr-defined]
    reranker._admitted = reranker.max_waiting  # every place taken
    try:
        answer = _search_images(teacher_client, rerank=True)
    finally:
        reranker._admitted = 0
    assert answer["reranked"] is False and answer["results"]
    assert all(hit["score"] == hit["retrieval_score"] for hit in answer["results"])
    assert _search_images(teacher_client, rerank=True)["reranked"] is True


def test_an_unreadable_gallery_image_does_not_fail_its_neighbours(
    teacher_client: TestClient, service_env: ServiceEnv
) -> None:
    plain = _search_images(teacher_client)
    broken = plain["results"][0]["id"]
    (service_env.images_dir / broken).write_bytes(b"not an image")
    reranked = _search_images(teacher_client, rerank=True)
    assert reranked["reranked"] is True and len(reranked["results"]) == 6
    last = reranked["results"][-1]  # unscored: after the scored ones, with its cosine score
    assert last["id"] == broken and last["score"] == last["retrieval_score"]


def test_rerank_order_puts_unscored_candidates_last() -> None:
    shortlist = [
        Scored(CaptionRecord(row, f"c{row}", "a caption", None), cosine)
        for row, cosine in enumerate([0.9, 0.8, 0.7, 0.6])
    ]
    ordered = rerank_order(shortlist, [1.0, None, 3.0, 1.0])
    assert [s.record.row for s in ordered] == [2, 0, 3, 1]  # ties keep cosine order
    assert [s.score for s in ordered] == [3.0, 1.0, 1.0, 0.8]
    assert ordered[3].teacher_score is None and ordered[3].retrieval_score == 0.8


def test_rerank_settings_are_validated() -> None:
    with pytest.raises(SettingsError, match="VLD_RERANK_CACHE_SIZE"):
        load_settings(rerank_cache_size=0)
    with pytest.raises(SettingsError, match="VLD_RERANK_DEFAULT"):
        load_settings(rerank_default="maybe")


def test_a_reranked_page_is_cut_from_the_reranked_order(teacher_client: TestClient) -> None:
    """With offset, the teacher re-orders the best rerank_k first; the page is cut after."""
    whole = _search_images(teacher_client, k=6, rerank=True, rerank_k=6)
    page = _search_images(teacher_client, k=2, offset=2, rerank=True, rerank_k=6)
    assert whole["reranked"] and page["reranked"]
    assert [hit["id"] for hit in page["results"]] == [hit["id"] for hit in whole["results"][2:4]]
    assert [hit["rank"] for hit in page["results"]] == [3, 4]
    assert page["count"] == 2 and page["offset"] == 2
    # min_score compares the cosine, not the (unbounded) teacher logit.
    threshold = sorted(hit["retrieval_score"] for hit in whole["results"])[3]
    kept = _search_images(teacher_client, k=6, rerank=True, rerank_k=6, min_score=threshold)
    assert kept["count"] == 3
    assert all(hit["retrieval_score"] >= threshold for hit in kept["results"])
