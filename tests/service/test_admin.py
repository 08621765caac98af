"""POST /admin/reload and CURRENT polling: validate, swap, refuse; leases keep old versions open."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from indexer.store import IndexVersion, StoreError, read_current
from service.app import create_app
from service.index_holder import IndexHolder, IndexRejectedError
from tests.service.conftest import TOKEN, ServiceEnv
from tests.service.helpers import assert_error, make_gallery

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _top_id(client: TestClient, text: str) -> str:
    response = client.post("/search/images", json={"text": text, "k": 1})
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["id"]


def test_the_endpoint_is_absent_without_a_token(client: TestClient) -> None:
    assert_error(client.post("/admin/reload", headers=AUTH), 404, "not_found")
    assert "/admin/reload" not in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
def test_reload_needs_the_bearer_token(
    make_client: Callable[..., TestClient], headers: dict[str, str]
) -> None:
    client = make_client(reload_token=TOKEN)
    response = client.post("/admin/reload", headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_reload_swaps_in_a_new_version_and_refuses_a_corrupt_one(
    tmp_path: Path, service_env: ServiceEnv, make_client: Callable[..., TestClient]
) -> None:
    client = make_client(reload_token=TOKEN)
    old = service_env.gallery
    assert client.post("/admin/reload", headers=AUTH).json() == {
        "status": "unchanged",
        "index_version": old.version,
        "previous_version": old.version,
    }

    new = make_gallery(
        service_env.root, tmp_path / "new-gallery", service_env.encoder, prefix="new"
    )
    new_query = new.captions[0][1]
    assert _top_id(client, new_query) in old.image_ids  # not reloaded yet
    response = client.post("/admin/reload", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "reloaded",
        "index_version": new.version,
        "previous_version": old.version,
    }
    assert client.get("/readyz").json()["index_version"] == new.version
    assert _top_id(client, new_query) == new.image_ids[0]

    bad = make_gallery(
        service_env.root, tmp_path / "bad-gallery", service_env.encoder, prefix="bad"
    )
    _flip_a_byte(service_env.root / "versions" / bad.version / "images.faiss")
    assert read_current(service_env.root) == bad.version
    error = assert_error(client.post("/admin/reload", headers=AUTH), 409, "index_refused")
    assert bad.version in error["message"] and "sha256" in error["message"]
    assert error["details"] and error["details"][0]["version"] == bad.version
    assert client.get("/readyz").json()["index_version"] == new.version  # still serving
    assert _top_id(client, new_query) == new.image_ids[0]
    metrics = client.get("/metrics").text
    assert 'vld_index_reloads_total{outcome="refused"} 1.0' in metrics
    assert f'vld_index_version_info{{version="{new.version}"}} 1.0' in metrics
    assert old.version not in metrics


def test_a_version_for_another_model_is_refused_on_reload(
    tmp_path: Path, service_env: ServiceEnv, make_client: Callable[..., TestClient]
) -> None:
    client = make_client(reload_token=TOKEN)
    make_gallery(service_env.root, tmp_path / "g", service_env.encoder, fingerprint="1" * 64)
    error = assert_error(client.post("/admin/reload", headers=AUTH), 409, "index_refused")
    assert "fingerprint mismatch" in error["message"]
    assert client.get("/readyz").json()["index_version"] == service_env.gallery.version


@pytest.mark.parametrize("mismatch", ["fingerprint", "dimension"])
def test_a_reload_without_verification_still_refuses_another_models_index(
    tmp_path: Path,
    service_env: ServiceEnv,
    make_client: Callable[..., TestClient],
    mismatch: str,
) -> None:
    """Skipping verification skips checksums and self-query, never the model check."""
    root = tmp_path / "root"
    root.mkdir()
    client = make_client(index_root=root, verify_on_start=False)
    holder = client.app.state.service.holder
    other: dict[str, Any] = {"fingerprint": "2" * 64} if mismatch == "fingerprint" else {"dim": 64}
    make_gallery(root, tmp_path / "other", service_env.encoder, prefix="other", **other)
    with pytest.raises(IndexRejectedError, match=f"{mismatch} mismatch"):
        holder.reload(verify=False)
    assert holder.current is None
    assert_error(client.get("/readyz"), 503, "not_ready")
    assert_error(client.post("/search/images", json={"text": "a"}), 503, "not_ready")

    # A holder already serving a version keeps serving it.
    good = make_gallery(root, tmp_path / "good", service_env.encoder, prefix="good")
    assert holder.reload(verify=False).status == "reloaded"
    make_gallery(root, tmp_path / "again", service_env.encoder, prefix="again", **other)
    with pytest.raises(IndexRejectedError, match=f"{mismatch} mismatch"):
        holder.reload(verify=False)
    assert client.get("/readyz").json()["index_version"] == good.version
    assert _top_id(client, good.captions[0][1]) == good.image_ids[0]


def test_polling_picks_up_new_versions_and_skips_refused_ones(
    tmp_path: Path, service_env: ServiceEnv, make_client: Callable[..., TestClient]
) -> None:
    client = make_client(poll_interval_s=0.1)

    def wait_for_version(version: str) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if client.get("/readyz").json()["index_version"] == version:
                return
            time.sleep(0.05)
        raise AssertionError(f"version {version} was not picked up")

    new = make_gallery(service_env.root, tmp_path / "new", service_env.encoder, prefix="new")
    wait_for_version(new.version)
    bad = make_gallery(service_env.root, tmp_path / "bad", service_env.encoder, prefix="bad")
    _flip_a_byte(service_env.root / "versions" / bad.version / "metadata.sqlite")
    time.sleep(0.8)  # several polls
    assert client.get("/readyz").json()["index_version"] == new.version
    assert 'vld_index_reloads_total{outcome="refused"} 1.0' in client.get("/metrics").text


def test_shutdown_waits_for_a_reload_in_progress_and_serves_nothing_after(
    tmp_path: Path, service_env: ServiceEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The poller is cancelled mid-reload at shutdown: the reload thread runs on, but it must
    not swap a version in after the holder was closed."""
    entered, release = threading.Event(), threading.Event()
    opened: list[IndexVersion] = []
    original = IndexHolder._open_validated

    def slow_open(holder: IndexHolder, version: str, *, verify: bool) -> IndexVersion:
        if version != service_env.gallery.version:  # the polled one, not the start-up one
            entered.set()
            release.wait(10)
        index = original(holder, version, verify=verify)
        opened.append(index)
        return index

    monkeypatch.setattr(IndexHolder, "_open_validated", slow_open)
    encoder = service_env.encoder
    app = create_app(service_env.settings(poll_interval_s=0.1), load_encoder=lambda s: encoder)
    state = app.state.service

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            make_gallery(service_env.root, tmp_path / "new", encoder, prefix="new")
            for _ in range(200):
                if entered.is_set():
                    break
                await asyncio.sleep(0.05)
            assert entered.is_set(), "the poller never started the reload"
            threading.Timer(0.3, release.set).start()  # the reload finishes during shutdown

    asyncio.run(scenario())
    assert release.is_set()  # shutdown waited for the reload thread
    assert state.holder.current is None
    with pytest.raises(IndexRejectedError, match="shutting down"):
        state.holder.reload()
    assert len(opened) == 2  # at start-up and by the poller
    for index in opened:  # nothing left open
        with pytest.raises(StoreError, match="closed"):
            index.image_records([0])


def test_a_leased_version_stays_open_until_its_last_request_ends(
    tmp_path: Path, service_env: ServiceEnv
) -> None:
    encoder = service_env.encoder
    holder = IndexHolder(
        service_env.root, fingerprint=encoder.fingerprint, dim=encoder.embedding_dim
    )
    holder.reload()
    query = encoder.text_vector(service_env.gallery.captions[0][1])[None]
    with holder.lease() as old:
        new = make_gallery(service_env.root, tmp_path / "n", encoder, prefix="n")
        assert holder.reload().status == "reloaded"
        assert holder.version == new.version and old.version == service_env.gallery.version
        _, rows = old.search_images(query, 1)  # the running request finishes on the old one
        assert old.image_records(rows[0].tolist())[0].id == service_env.gallery.image_ids[0]
    with pytest.raises(StoreError, match="closed"):  # closed once the lease ended
        old.image_records([0])
    with holder.lease() as current:
        assert current.version == new.version
    holder.close()


def test_a_holder_refuses_when_nothing_is_published(tmp_path: Path) -> None:
    holder = IndexHolder(tmp_path, fingerprint="f", dim=4)
    with pytest.raises(IndexRejectedError, match="nothing is published"):
        holder.reload()
    assert holder.current is None and "nothing is published" in (holder.problem or "")
