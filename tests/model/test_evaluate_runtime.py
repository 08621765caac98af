"""``vldeformer-eval --runtime``: decomposed retrieval through an encoder runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import model.evaluate
from model.evaluate import main
from model.runtime import RuntimeUnavailable
from model.synthetic import SyntheticConfig, write_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = SyntheticConfig(image_size=32, n_train=4, n_val=4, n_test=6)
    return write_dataset(tmp_path_factory.mktemp("captions"), config)


def _decomposed_metrics(argv: list[str], json_path: Path) -> dict[str, float]:
    assert main([*argv, "--json", str(json_path)]) == 0
    metrics: dict[str, float] = json.loads(json_path.read_text())["results"]["decomposed"][
        "metrics"
    ]
    return metrics


def test_the_onnx_runtime_evaluates_like_torch(
    tiny_vilt_dir: Path, dataset_json: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime")
    loaded: list[str] = []
    real_load = model.evaluate.load_encoder

    def spy(model_dir: Path, runtime: str, **kwargs: Any) -> Any:
        encoder = real_load(model_dir, runtime, **kwargs)
        loaded.append(encoder.runtime)
        return encoder

    monkeypatch.setattr(model.evaluate, "load_encoder", spy)
    argv = ["--model", str(tiny_vilt_dir), "--data", str(dataset_json), "--protocol", "full",
            "--batch-size", "4", "--no-progress"]  # fmt: skip
    torch_metrics = _decomposed_metrics(argv, tmp_path / "torch.json")
    assert loaded == []  # torch loads the VLDeformer itself
    onnx_metrics = _decomposed_metrics([*argv, "--runtime", "onnx"], tmp_path / "onnx.json")
    assert loaded == ["onnx"]
    assert onnx_metrics == pytest.approx(torch_metrics, abs=1e-6)


def test_an_unavailable_or_unknown_runtime_exits_2(
    tiny_vilt_dir: Path,
    dataset_json: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def refuse(*args: object, **kwargs: object) -> object:
        raise RuntimeUnavailable("the ONNX runtimes need onnxruntime")

    monkeypatch.setattr(model.evaluate, "load_encoder", refuse)
    argv = ["--model", str(tiny_vilt_dir), "--data", str(dataset_json), "--no-progress",
            "--protocol", "full"]  # fmt: skip
    assert main([*argv, "--runtime", "onnx-int8"]) == 2
    assert "vldeformer-eval: error: the ONNX runtimes need onnxruntime" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--runtime", "tensorrt"])
    assert exited.value.code == 2
