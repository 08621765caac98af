"""End to end: the indexer CLI builds an index over a generated gallery, `vldeformer-serve`
runs as a real process on a free loopback port, and HTTP clients and a real headless Chromium
query it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.service.helpers import build_index, synthetic_gallery

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "model" / "assets" / "demo" / "decomposed"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Served:
    base_url: str
    model_dir: Path
    root: Path
    images: Path
    captions: list[dict[str, str]]
    log: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve_command() -> list[str]:
    script = Path(sys.executable).parent / "vldeformer-serve"
    if script.exists():
        return [str(script)]
    if os.environ.get("CI"):
        pytest.fail(f"{script} is missing: `make install-dev` installs the console script")
    return [sys.executable, "-m", "service"]  # the same main(), before `pip install -e .`


def _manifest_with_metadata(images: Path) -> Path:
    """A JSONL gallery manifest next to ``images`` giving each image metadata to filter on:
    ``half`` ("first" / "second" in name order) and ``position`` (0, 1, …)."""
    names = sorted(path.name for path in images.iterdir())
    manifest = images.parent / "gallery.jsonl"
    manifest.write_text(
        "".join(
            json.dumps(
                {
                    "id": name,
                    "path": f"{images.name}/{name}",
                    "half": "first" if 2 * i < len(names) else "second",
                    "position": i,
                }
            )
            + "\n"
            for i, name in enumerate(names)
        )
    )
    return manifest


@pytest.fixture(scope="module")
def served(tiny_vilt_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("e2e")
    # The committed demo model makes "a caption finds its own image" a real retrieval check
    # (over 100 scenes with colour- and relation-swapped twins); the tiny random model only
    # exercises the plumbing.
    model_dir = DEMO_MODEL if (DEMO_MODEL / "config.json").is_file() else tiny_vilt_dir
    images, captions_file = synthetic_gallery(
        base / "gallery", n=100 if model_dir == DEMO_MODEL else 8, seed=3
    )
    root = base / "index"
    build_index(model_dir, root, _manifest_with_metadata(images), captions_file)
    port = _free_port()
    env = {
        **os.environ,
        "VLD_MODEL_DIR": str(model_dir),
        "VLD_INDEX_ROOT": str(root),
        # The tiny teacher re-ranks any gallery (its own tokenizer and image processor): the
        # browser test checks the re-rank plumbing, not its quality.
        "VLD_TEACHER_DIR": str(tiny_vilt_dir),
        "VLD_HOST": "127.0.0.1",
        "VLD_PORT": str(port),
        "VLD_DEVICE": "cpu",
        "VLD_LOG_LEVEL": "info",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    log = base / "server.log"
    with log.open("wb") as log_stream:
        process = subprocess.Popen(
            _serve_command(), cwd=ROOT, env=env, stdout=log_stream, stderr=subprocess.STDOUT
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready in 90 s:\n{log.read_text()}")
            time.sleep(0.2)
        captions = [json.loads(line) for line in captions_file.read_text().splitlines() if line]
        yield Served(base_url, model_dir, root, images, captions, log)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_both_endpoints_over_http_match_the_model_and_index(served: Served) -> None:
    from indexer.store import IndexVersion
    from model import VLDeformer

    model = VLDeformer.from_pretrained(served.model_dir, device="cpu")
    index = IndexVersion.open(served.root)
    try:
        with httpx.Client(base_url=served.base_url, timeout=30) as client:
            ready = client.get("/readyz").json()
            assert ready["rerank_available"] is True and len(ready["teacher_fingerprint"]) == 64
            assert client.get("/healthz").json() == {"status": "ok"}
            for caption in served.captions[::7]:
                response = client.post("/search/images", json={"text": caption["caption"], "k": 10})
                assert response.status_code == 200, response.text
                body = response.json()
                ids = [hit["id"] for hit in body["results"]]
                assert caption["image"] in ids  # the caption finds its own image in the top 10
                assert body["index_version"] == index.version
                # Exactly what the model and the index give in-process.
                scores, rows = index.search_images(model.encode_text([caption["caption"]]), 10)
                assert ids == [r.id for r in index.image_records([r for r in rows[0] if r >= 0])]
                np.testing.assert_allclose(
                    [hit["score"] for hit in body["results"]], scores[0][: len(ids)], atol=1e-4
                )
                own = next(hit for hit in body["results"] if hit["id"] == caption["image"])
                assert caption["caption"] in own["captions"]
                image = client.get(own["url"])
                assert image.status_code == 200
                assert image.content == (served.images / caption["image"]).read_bytes()

            picture = served.images / served.captions[0]["image"]
            response = client.post(
                "/search/captions",
                files={"image": (picture.name, picture.read_bytes(), "image/png")},
                data={"k": "5"},
            )
            assert response.status_code == 200, response.text
            hits = response.json()["results"]
            assert len(hits) == 5 and [hit["rank"] for hit in hits] == [1, 2, 3, 4, 5]
            from PIL import Image

            with Image.open(picture) as opened:
                query = model.encode_images([opened.convert("RGB")])
            scores, rows = index.search_captions(query, 5)
            assert [hit["id"] for hit in hits] == [r.id for r in index.caption_records(rows[0])]
            np.testing.assert_allclose([hit["score"] for hit in hits], scores[0], atol=1e-4)

            bad = client.post(
                "/search/captions", content=b"not an image", headers={"content-type": "image/png"}
            )
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "not_an_image"
            metrics = client.get("/metrics").text
            assert (
                'vld_http_requests_total{endpoint="/search/images",method="POST",status="200"}'
                in metrics
            )
    finally:
        index.close()


def test_oversized_bodies_get_413_over_real_http(served: Served) -> None:
    """Both with Content-Length (refused before reading) and chunked (refused mid-stream)."""
    data = b"\0" * (10 * 1024 * 1024 + 1)

    def chunked() -> Iterator[bytes]:
        for start in range(0, len(data), 64 * 1024):
            yield data[start : start + 64 * 1024]

    with httpx.Client(base_url=served.base_url, timeout=60) as client:
        for body in (data, chunked()):
            response = client.post(
                "/search/captions", content=body, headers={"content-type": "image/png"}
            )
            assert response.status_code == 413
            assert response.json()["error"]["code"] == "payload_too_large"
        assert client.get("/readyz").status_code == 200  # still serving


def _chromium_or_skip() -> Path:
    if CHROMIUM.exists() or shutil.which("chromium"):
        return CHROMIUM if CHROMIUM.exists() else Path(shutil.which("chromium") or "")
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing: .ci/run installs Debian's chromium package")
    pytest.skip("Chromium is not installed here (apt-get install chromium)")


def _status_once_it_says(page: Any, words: str) -> str:
    """The page's status line, once it contains ``words`` (a search has finished)."""
    page.wait_for_function(
        f"() => document.getElementById('status').innerText.includes({json.dumps(words)})"
    )
    return str(page.inner_text("#status"))


def _shown_ids(page: Any) -> list[str]:
    return list(
        page.locator("#image-results li.result").evaluate_all(
            "items => items.map(item => item.dataset.id)"
        )
    )


def test_the_web_page_in_a_real_browser(served: Served, tmp_path: Path) -> None:
    chromium = _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    picture = served.images / served.captions[0]["image"]
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(chromium),
            headless=True,
            args=CHROMIUM_FLAGS,
        )
        try:
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(served.base_url + "/")
            assert page.title() == "vldeformer search"

            page.fill("#text-query", served.captions[0]["caption"])
            page.fill("#text-k", "10")
            page.click("#text-search")
            page.wait_for_selector("#image-results li.result img")
            results = page.locator("#image-results li.result")
            gallery_size = sum(1 for _ in served.images.iterdir())
            assert results.count() == min(10, gallery_size)  # k, or the whole smaller gallery
            page.wait_for_function(
                "() => [...document.querySelectorAll('#image-results img')]"
                ".every(img => img.complete && img.naturalWidth > 0)"
            )
            first_score = float(page.locator("#image-results .score").first.inner_text())
            assert -1.0 <= first_score <= 1.0
            shown = page.locator("#image-results img").evaluate_all(
                "images => images.map(img => img.getAttribute('src'))"
            )
            assert f"/images/{served.captions[0]['image']}" in shown
            # Each card shows its image's caption (not only a file name) and labels the score.
            captions_of: dict[str, set[str]] = {}
            for row in served.captions:
                captions_of.setdefault(row["image"], set()).add(row["caption"])
            cards = results.evaluate_all(
                """items => items.map(item => ({
                    src: item.querySelector('img').getAttribute('src'),
                    caption: item.querySelector('.image-caption').innerText,
                    text: item.querySelector('figcaption').innerText,
                }))"""
            )
            for card in cards:
                image_id = card["src"].rsplit("/", 1)[-1]
                assert card["caption"].strip() in captions_of[image_id], card
                assert "similarity" in card["text"], card
            assert "cosine similarity" in page.inner_text("#score-help")
            # Limits come from the server; a refused query shows the server's reason.
            assert page.get_attribute("#text-query", "maxlength") == "1000"
            assert page.get_attribute("#text-k", "max") == "100"
            page.fill("#text-query", "   ")
            page.click("#text-search")
            page.wait_for_selector("#status.error")
            assert "empty after trimming whitespace" in page.inner_text("#status")

            page.set_input_files("#image-file", str(picture))
            page.click("#image-search")
            page.wait_for_selector("#caption-results li.caption-result")
            captions = page.locator("#caption-results .caption-text").all_inner_texts()
            assert len(captions) == 10
            known = {caption["caption"] for caption in served.captions}
            assert all(text.strip() in known for text in captions)
            assert page.locator("#image-results li").count() == 0  # the grid was replaced
            assert "captions in" in page.inner_text("#status")
            assert "re-ranked" not in page.inner_text("#status")

            # The re-rank checkbox: both searches come back re-ranked by the teacher.
            assert not page.is_checked("#rerank")
            page.check("#rerank")
            page.click("#image-search")
            assert "re-ranked by the teacher" in _status_once_it_says(page, "captions in")
            reranked = page.locator("#caption-results .score").all_inner_texts()
            assert len(reranked) == 10 and all("cosine" in text for text in reranked)
            page.fill("#text-query", served.captions[0]["caption"])
            page.click("#text-search")
            assert "re-ranked by the teacher" in _status_once_it_says(page, "images in")
            cards = page.locator("#image-results figcaption").all_inner_texts()
            assert cards and all("teacher score" in text for text in cards)
            scores = page.locator("#image-results .score").evaluate_all(
                "spans => spans.map(span => Number(span.dataset.score))"
            )
            assert scores[:10] == sorted(scores[:10], reverse=True)  # the shortlist (k=10 < 20)

            # "More like this" on a result: other images, the clicked one not among them.
            page.uncheck("#rerank")
            before = _shown_ids(page)
            clicked = before[1]
            page.locator("#image-results li.result").nth(1).locator(".more-like-this").click()
            status = _status_once_it_says(page, f"images like {clicked}")
            after = _shown_ids(page)
            assert clicked not in after and after != before
            assert len(after) == min(10, gallery_size - 1)  # k others, itself left out
            assert status.startswith(f"{len(after)} images like")

            # A filter applies to the search: every result satisfies it, the count is shown.
            page.fill("#filter", '{"half": "first"}')
            page.fill("#text-query", served.captions[0]["caption"])
            page.click("#text-search")
            status = _status_once_it_says(page, "images in")
            metadata = page.locator("#image-results li.result").evaluate_all(
                "items => items.map(item => JSON.parse(item.dataset.metadata))"
            )
            assert metadata and all(fields["half"] == "first" for fields in metadata), metadata
            assert len(metadata) == min(10, gallery_size // 2 + gallery_size % 2)
            assert status.startswith(f"{len(metadata)} images in")
            assert all(
                "half: first" in text for text in page.locator(".metadata").all_inner_texts()
            )
            # A filter on an unknown field is refused with the server's reason.
            page.fill("#filter", '{"album": "2024"}')
            page.click("#text-search")
            page.wait_for_selector("#status.error")
            assert "album" in page.inner_text("#status")
        finally:
            context.close()
