"""Hot reload under load, with the real tiny model and indexes built by the indexer CLI:
no request fails, answers switch to the new version's ids, a corrupt version is refused."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer.store import version_dir
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import TOKEN
from tests.service.helpers import build_index, synthetic_gallery

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_reload_under_load_drops_nothing_and_refuses_a_corrupt_version(
    tiny_vilt_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "index"
    old_images, old_captions = synthetic_gallery(tmp_path / "old", n=6, seed=1, prefix="old_")
    new_images, new_captions = synthetic_gallery(tmp_path / "new", n=6, seed=2, prefix="new_")
    old_version = build_index(tiny_vilt_dir, root, old_images, old_captions)
    settings = Settings(
        model_dir=tiny_vilt_dir, index_root=root, device="cpu", reload_token=TOKEN,
        batch_window_ms=2.0,
    )  # fmt: skip
    query_image = next(old_images.iterdir()).read_bytes()

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/readyz").json()["index_version"] == old_version
        stop = threading.Event()
        outcomes: list[tuple[str, int, str | None, list[str]]] = []
        lock = threading.Lock()

        def send_queries(worker: int) -> None:
            deadline = time.monotonic() + 60  # bounded even if the test body hangs
            while not stop.is_set() and time.monotonic() < deadline:
                if worker % 2 == 0:
                    response = client.post("/search/images", json={"text": "a red circle", "k": 3})
                    kind = "text"
                else:
                    response = client.post(
                        "/search/captions?k=3", content=query_image,
                        headers={"content-type": "image/png"},
                    )  # fmt: skip
                    kind = "image"
                body = response.json() if response.status_code == 200 else {}
                ids = [hit.get("image_id") or hit["id"] for hit in body.get("results", [])]
                with lock:
                    outcomes.append((kind, response.status_code, body.get("index_version"), ids))

        workers = [threading.Thread(target=send_queries, args=(i,)) for i in range(4)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(0.5)
            new_version = build_index(tiny_vilt_dir, root, new_images, new_captions)
            reload = client.post("/admin/reload", headers=AUTH)
            assert reload.status_code == 200, reload.text
            assert reload.json()["index_version"] == new_version
            time.sleep(0.5)

            # A corrupt version is refused and the current one keeps serving under load.
            bad_version = build_index(tiny_vilt_dir, root, old_images, old_captions)
            faiss_file = version_dir(root, bad_version) / "captions.faiss"
            data = bytearray(faiss_file.read_bytes())
            data[-5] ^= 0x55
            faiss_file.write_bytes(bytes(data))
            refused = client.post("/admin/reload", headers=AUTH)
            assert refused.status_code == 409, refused.text
            assert refused.json()["error"]["code"] == "index_refused"
            time.sleep(0.5)
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=30)
        assert client.get("/readyz").json()["index_version"] == new_version

    statuses = Counter(status for _, status, _, _ in outcomes)
    assert statuses == Counter({200: len(outcomes)}), statuses  # zero failed requests
    versions = [version for _, _, version, _ in outcomes]
    assert versions[0] == old_version and versions[-1] == new_version
    assert set(versions) == {old_version, new_version}  # never the refused one
    first_new = versions.index(new_version)
    assert all(
        v == new_version for v in versions[first_new + 4 :]
    )  # 4 workers: at most 4 stragglers
    for _, _, version, ids in outcomes:
        assert ids and all(i.startswith("old_" if version == old_version else "new_") for i in ids)
    assert sum(1 for kind, *_ in outcomes if kind == "image") > 4
