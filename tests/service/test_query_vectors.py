"""The vectors the service searches with are unit rows of the model's dimension, for every
runtime the service can load the model with (real tiny model, loaded by the app itself)."""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from indexer.store import IndexVersion
from service.app import create_app
from tests.service.conftest import TinyModelEnv

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Every way the service can run the model (VLD_DEVICE, VLD_RUNTIME). A new runtime gets a row.
ONNX = pytest.mark.skipif(not find_spec("onnxruntime"), reason="needs onnxruntime")
RUNTIMES = [
    pytest.param("cpu", "torch", id="torch-cpu"),
    pytest.param("cuda", "torch", id="torch-cuda", marks=[pytest.mark.gpu, CUDA]),
    pytest.param("auto", "onnx", id="onnx-cpu", marks=ONNX),
    pytest.param("auto", "onnx-int8", id="onnx-int8-cpu", marks=ONNX),
]


@pytest.mark.parametrize(("device", "runtime"), RUNTIMES)
def test_query_vectors_are_unit_rows(
    tiny_model_env: TinyModelEnv, monkeypatch: pytest.MonkeyPatch, device: str, runtime: str
) -> None:
    searched: list[tuple[str, np.ndarray]] = []
    original = IndexVersion.search

    def recording_search(
        index: IndexVersion, modality: str, xq: np.ndarray, k: int, **options: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        searched.append((modality, xq.copy()))
        return original(index, modality, xq, k, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(IndexVersion, "search", recording_search)
    settings = tiny_model_env.settings(device=device, runtime=runtime, torch_threads=1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/readyz").json()["runtime"] == runtime
        text = client.post("/search/images", json={"text": "a red square", "k": 3})
        assert text.status_code == 200, text.text
        picture = tiny_model_env.gallery.image_paths[0].read_bytes()
        image = client.post(
            "/search/captions", content=picture, headers={"content-type": "image/png"}
        )
        assert image.status_code == 200, image.text
        scores = [hit["score"] for r in (text, image) for hit in r.json()["results"]]

    assert [modality for modality, _ in searched] == ["images", "captions"]
    for _, xq in searched:
        assert xq.dtype == np.float32 and xq.shape == (1, tiny_model_env.model.embedding_dim)
        np.testing.assert_allclose(np.linalg.norm(xq, axis=1), 1.0, atol=1e-5)
    assert all(-1.0 - 1e-5 <= score <= 1.0 + 1e-5 for score in scores), scores  # cosines
