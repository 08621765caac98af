"""VLD_RUNTIME: the query encoder's runtime, /readyz, refusing indexes of incompatible
runtimes at start-up and on reload, and the CLI's one-line exit 2 for an unusable runtime."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, get_args

import pytest
from fastapi.testclient import TestClient

import model.runtime
from model.runtime import RUNTIMES, RuntimeCheck, RuntimeUnavailable
from service.__main__ import main
from service.app import create_app, load_model
from service.settings import Settings
from tests.service.conftest import TOKEN, ServiceEnv, TinyModelEnv
from tests.service.helpers import FakeEncoder, make_gallery

AUTH = {"Authorization": f"Bearer {TOKEN}"}


class CheckedEncoder(FakeEncoder):
    """The fake encoder as if served by an ONNX runtime with the given check outcome."""

    def __init__(self, runtime: str, passed: bool) -> None:
        super().__init__()
        self.runtime = runtime
        self.check = RuntimeCheck(runtime, self.fingerprint, 0.999, 0.9995, None, passed)


def test_the_setting_offers_every_runtime_of_the_model() -> None:
    choices = get_args(Settings.model_fields["runtime"].annotation)
    assert set(choices) == {*RUNTIMES, "auto"}
    assert Settings().runtime == "torch"


def test_an_onnx_service_answers_like_torch_and_readyz_says_onnx(
    tiny_model_env: TinyModelEnv,
) -> None:
    pytest.importorskip("onnxruntime")
    answers: dict[str, dict[str, float]] = {}
    for runtime in ("torch", "onnx"):
        settings = tiny_model_env.settings(runtime=runtime, torch_threads=1)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["runtime"] == runtime
            assert ready.json()["index_runtime"] == "torch"  # built from torch vectors
            response = client.post("/search/images", json={"text": "a red square", "k": 6})
            assert response.status_code == 200, response.text
            answers[runtime] = {hit["id"]: hit["score"] for hit in response.json()["results"]}
    assert set(answers["onnx"]) == set(answers["torch"])
    for image_id, score in answers["torch"].items():
        assert answers["onnx"][image_id] == pytest.approx(score, abs=0.01)


def test_an_index_of_an_unknown_runtime_is_refused_at_start_up(
    service_env: ServiceEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "other"
    make_gallery(root, tmp_path / "pictures", service_env.encoder, runtime="tensorrt")
    app = create_app(service_env.settings(index_root=root), load_encoder=lambda s: FakeEncoder())
    with TestClient(app, raise_server_exceptions=False) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        message = ready.json()["error"]["message"]
        assert "encoder runtime mismatch" in message and "'tensorrt'" in message
        search = client.post("/search/images", json={"text": "anything", "k": 1})
        assert search.status_code == 503
    assert any("'tensorrt'" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_a_reload_serves_a_checked_runtime_and_keeps_the_old_version_on_an_unknown_one(
    service_env: ServiceEnv, tmp_path: Path, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    encoder = CheckedEncoder("onnx-int8", passed=True)
    client = make_client(encoder, reload_token=TOKEN)
    ready = client.get("/readyz").json()
    assert (ready["runtime"], ready["index_runtime"]) == ("onnx-int8", "torch")
    checked = make_gallery(service_env.root, tmp_path / "a", encoder, prefix="a", runtime="onnx")
    assert client.post("/admin/reload", headers=AUTH).status_code == 200
    ready = client.get("/readyz").json()
    assert (ready["index_version"], ready["index_runtime"]) == (checked.version, "onnx")
    make_gallery(service_env.root, tmp_path / "b", encoder, prefix="b", runtime="tensorrt")
    response = client.post("/admin/reload", headers=AUTH)
    assert response.status_code == 409
    assert "encoder runtime mismatch" in response.json()["error"]["message"]
    ready = client.get("/readyz").json()  # still ready, on the old version
    assert (ready["index_version"], ready["index_runtime"]) == (checked.version, "onnx")
    assert any("'tensorrt'" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_compatible_decides_the_refusal(
    service_env: ServiceEnv, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Torch queries accept every known runtime's index, unless compatible() says otherwise."""
    asked: list[tuple[str, str]] = []

    def never(index_runtime: str, serve_runtime: str, check: RuntimeCheck | None) -> bool:
        asked.append((index_runtime, serve_runtime))
        return False

    monkeypatch.setattr(model.runtime, "compatible", never)
    client = make_client()
    assert client.get("/readyz").status_code == 503
    assert ("torch", "torch") in asked


def test_a_bad_runtime_setting_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VLD_RUNTIME", "tensorrt")
    assert main(["--model-dir", str(tmp_path), "--index-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: invalid settings: VLD_RUNTIME=")


def test_an_unavailable_runtime_at_start_up_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def unavailable(*args: object, **kwargs: object) -> object:
        raise RuntimeUnavailable("the onnx export failed:\n  Traceback of the exporter")

    def no_server(config: object) -> object:
        raise AssertionError("uvicorn must not start")

    monkeypatch.setattr(model.runtime, "load_encoder", unavailable)
    monkeypatch.setattr("service.__main__.uvicorn.Server", no_server)
    args = ["--model-dir", str(tmp_path), "--index-root", str(tmp_path), "--runtime", "onnx"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == "error: VLD_RUNTIME=onnx: the onnx export failed: Traceback of the exporter\n"


def test_auto_falls_back_to_torch_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loaded: list[str] = []

    def load(model_dir: Path, runtime: str, **kwargs: object) -> object:
        loaded.append(runtime)
        if runtime != "torch":
            raise RuntimeUnavailable(f"{runtime} was refused by its check")
        return FakeEncoder()

    monkeypatch.setattr(model.runtime, "pick_default_runtime", lambda model_dir: "onnx-int8")
    monkeypatch.setattr(model.runtime, "load_encoder", load)
    settings = Settings(model_dir=tmp_path, index_root=tmp_path, device="cpu", runtime="auto")
    with caplog.at_level(logging.WARNING, logger="service.app"):
        encoder = load_model(settings)
    assert isinstance(encoder, FakeEncoder) and loaded == ["onnx-int8", "torch"]
    assert any("serving with torch" in record.getMessage() for record in caplog.records)
    # Named explicitly, the same refusal is an error, not a fallback.
    with pytest.raises(RuntimeUnavailable):
        load_model(Settings(model_dir=tmp_path, index_root=tmp_path, runtime="onnx-int8"))
