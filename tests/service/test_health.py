"""/healthz, /readyz (including refused indexes), /metrics, and the web page."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import ServiceEnv
from tests.service.helpers import FakeEncoder, assert_error, make_gallery


def test_healthz_and_readyz_when_ready(client: TestClient, service_env: ServiceEnv) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "index_version": service_env.gallery.version,
        "model_fingerprint": service_env.encoder.fingerprint,
        "embedding_dim": service_env.encoder.embedding_dim,
        "runtime": "torch",
        "index_runtime": "torch",
        "image_count": 6,
        "caption_count": 12,
        "rerank_available": False,
        "teacher_fingerprint": None,
        "rerank_problem": "no teacher is configured (VLD_TEACHER_DIR is unset)",
        "metadata_fields": {
            "colour": "string",
            "even": "boolean",
            "number": "number",
            "tags": "string_list",
        },
    }


@pytest.mark.parametrize("verify_on_start", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("mismatch", ["fingerprint", "dimension"])
def test_an_index_built_for_another_model_is_refused(
    tmp_path: Path,
    service_env: ServiceEnv,
    make_client: Callable[..., TestClient],
    caplog: pytest.LogCaptureFixture,
    mismatch: str,
    verify_on_start: bool,
) -> None:
    """The model check is not part of verification: it holds with VLD_VERIFY_ON_START=false."""
    root = tmp_path / "other-index"
    if mismatch == "fingerprint":
        make_gallery(root, tmp_path / "g2", service_env.encoder, fingerprint="0" * 64)
    else:
        make_gallery(root, tmp_path / "g2", service_env.encoder, dim=64)
    with caplog.at_level(logging.ERROR):
        client = make_client(index_root=root, verify_on_start=verify_on_start)
    assert client.get("/healthz").status_code == 200
    error = assert_error(client.get("/readyz"), 503, "not_ready")
    assert mismatch in error["message"]
    assert any(
        mismatch in record.getMessage() and "refused" in record.getMessage()
        for record in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert_error(client.post("/search/images", json={"text": "a"}), 503, "not_ready")
    assert client.app.state.service.holder.current is None  # never served


@pytest.mark.parametrize("damage", ["manifest", "index file"])
def test_with_verification_off_an_unreadable_version_is_still_refused(
    service_env: ServiceEnv, make_client: Callable[..., TestClient], damage: str
) -> None:
    """VLD_VERIFY_ON_START=false skips the checksums of the data files, not reading them."""
    directory = service_env.root / "versions" / service_env.gallery.version
    if damage == "manifest":
        manifest = directory / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"images": 6', '"images": 7', 1))
    else:
        (directory / "images.faiss").unlink()
    client = make_client(verify_on_start=False)
    error = assert_error(client.get("/readyz"), 503, "not_ready")
    assert "refused" in error["message"]
    assert_error(client.post("/search/images", json={"text": "a"}), 503, "not_ready")
    assert client.app.state.service.holder.current is None


def test_nothing_published_is_not_ready(
    tmp_path: Path, make_client: Callable[..., TestClient]
) -> None:
    empty = tmp_path / "empty-root"
    empty.mkdir()
    client = make_client(index_root=empty)
    error = assert_error(client.get("/readyz"), 503, "not_ready")
    assert "nothing is published" in error["message"]


def test_a_missing_model_dir_setting_fails_start_up_naming_the_variable(
    service_env: ServiceEnv,
) -> None:
    from service.app import create_app

    app = create_app(service_env.settings(model_dir=None), load_encoder=lambda s: FakeEncoder())
    with pytest.raises(Exception, match="VLD_MODEL_DIR"), TestClient(app):
        pass


def _samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_metrics_cover_requests_encoding_search_batches_queue_and_index(
    client: TestClient, service_env: ServiceEnv
) -> None:
    client.post("/search/images", json={"text": "one", "k": 2})
    client.post("/search/images", json={"text": ""})
    with service_env.gallery.image_paths[0].open("rb") as image:
        client.post("/search/captions", files={"image": ("q.png", image, "image/png")})
    client.get("/no/such/path/12345")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)

    requests = {
        (s.labels["endpoint"], s.labels["method"], s.labels["status"]): s.value
        for s in samples["vld_http_requests_total"]
    }
    assert requests[("/search/images", "POST", "200")] == 1
    assert requests[("/search/images", "POST", "422")] == 1
    assert requests[("/search/captions", "POST", "200")] == 1
    assert requests[("unmatched", "GET", "404")] == 1  # raw paths never become labels
    latency = {
        (s.labels["endpoint"], s.labels["status"])
        for s in samples["vld_http_request_duration_seconds_count"]
    }
    assert ("/search/images", "200") in latency
    for name in ("vld_encode_seconds_count", "vld_search_seconds_count", "vld_batch_size_count"):
        assert {s.labels["modality"]: s.value for s in samples[name]} == {"text": 1, "image": 1}
    assert {s.labels["modality"] for s in samples["vld_queue_depth"]} == {"text", "image"}
    sizes = {s.labels["modality"]: s.value for s in samples["vld_index_vectors"]}
    assert sizes == {"image": 6, "caption": 12}
    (version,) = samples["vld_index_version_info"]
    assert version.labels["version"] == service_env.gallery.version and version.value == 1


def test_two_apps_in_one_process_keep_separate_metrics(
    make_client: Callable[..., TestClient],
) -> None:
    first, second = make_client(), make_client()
    first.post("/search/images", json={"text": "hello"})
    assert '/search/images",method="POST",status="200"' in first.get("/metrics").text
    assert '/search/images",method="POST",status="200"' not in second.get("/metrics").text


def test_the_page_is_served_and_self_contained(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    for needed in (
        'id="text-query"',
        'id="image-file"',
        'id="filter"',
        "search/images",
        "search/captions",
        "search/similar-images",
        "more like this",
    ):
        assert needed in html
    assert "http://" not in html and "https://" not in html  # no CDN, no external fetch
    example = client.get("/examples/query.png")
    assert example.status_code == 200 and example.content.startswith(b"\x89PNG")


def test_the_page_takes_its_limits_from_the_settings(
    make_client: Callable[..., TestClient],
) -> None:
    html = make_client(max_k=7, max_text_chars=50).get("/").text
    assert 'maxlength="50"' in html
    assert html.count('max="7"') == 2  # both k inputs
    assert 'value="7"' in html  # the default k never exceeds the limit
    assert "{{" not in html and "}}" not in html
    assert 'href="favicon.ico"' in html
