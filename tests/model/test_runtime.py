"""Encoder runtimes (model.runtime): ONNX fp32 / int8 against torch fp32 on a tiny random ViLT."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("onnxruntime", reason="the `onnx` extra is not installed")

from model import runtime as runtime_module
from model import runtime_check
from model.onnx_export import _bilinear_weights
from model.runtime import (
    CHECK_FILE,
    RUNTIMES,
    OnnxEncoder,
    RuntimeCheck,
    RuntimeEncoder,
    RuntimeUnavailable,
    TorchEncoder,
    compatible,
    export_dir,
    load_encoder,
    pick_default_runtime,
)
from model.testing import make_tiny_demo_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [
    "a red circle",
    "two small shapes left of a big blue square above a tiny green triangle near a star",
    "picture",
    "a purple cross and an orange star",
    "the image of one large grey shape",
    "shapes",
    "a pink square below a white circle",
]
MIN_COSINE = {"onnx": 0.9999, "onnx-int8": 0.99}


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (100, 30), (20, 90), (64, 64), (7, 300), (48, 40)]  # (width, height)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_demo_models(tmp_path_factory.mktemp("runtime")) / "decomposed"


@pytest.fixture(scope="module")
def torch_encoder(model_dir: Path) -> TorchEncoder:
    encoder = load_encoder(model_dir, "torch")
    assert isinstance(encoder, TorchEncoder)
    return encoder


@pytest.fixture(scope="module")
def onnx_encoders(model_dir: Path) -> dict[str, OnnxEncoder]:
    encoders = {name: load_encoder(model_dir, name, threads=1) for name in ("onnx", "onnx-int8")}
    assert all(isinstance(encoder, OnnxEncoder) for encoder in encoders.values())
    return encoders  # type: ignore[return-value]


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_text_vectors_match_torch(
    torch_encoder: TorchEncoder,
    onnx_encoders: dict[str, OnnxEncoder],
    runtime: str,
    batch_size: int,
) -> None:
    reference = torch_encoder.encode_text(TEXTS, batch_size=batch_size)
    vectors = onnx_encoders[runtime].encode_text(TEXTS, batch_size=batch_size)
    assert vectors.shape == (len(TEXTS), torch_encoder.embedding_dim)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert _cosines(reference, vectors).min() >= MIN_COSINE[runtime]


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
@pytest.mark.parametrize("batch_size", [1, 4, 6])
def test_image_vectors_match_torch_at_any_size(
    torch_encoder: TorchEncoder,
    onnx_encoders: dict[str, OnnxEncoder],
    runtime: str,
    batch_size: int,
) -> None:
    images = _images()
    reference = torch_encoder.encode_images(images, batch_size=batch_size)
    vectors = onnx_encoders[runtime].encode_images(images, batch_size=batch_size)
    assert vectors.shape == (len(images), torch_encoder.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert _cosines(reference, vectors).min() >= MIN_COSINE[runtime]


def test_tensor_level_encoders_match_torch(
    torch_encoder: TorchEncoder, onnx_encoders: dict[str, OnnxEncoder]
) -> None:
    encoder = onnx_encoders["onnx"]
    pixel_values, pixel_mask = encoder.preprocess(_images())
    tokens = encoder.tokenize(TEXTS)
    with torch.inference_mode():
        expected_images = torch_encoder.encode_pixels(pixel_values, pixel_mask)
        expected_texts = torch_encoder.encode_tokens(tokens["input_ids"], tokens["attention_mask"])
    images = encoder.encode_pixels(pixel_values, pixel_mask)
    texts = encoder.encode_tokens(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(images, expected_images, atol=1e-4, rtol=0)
    torch.testing.assert_close(texts, expected_texts, atol=1e-4, rtol=0)
    assert encoder.device.type == "cpu" and encoder.dtype == torch.float32


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("grid", [2, 12])
def test_bilinear_weights_match_interpolate(count: int, grid: int) -> None:
    signal = torch.randn(1, 1, grid, 1, generator=torch.Generator().manual_seed(count))
    expected = F.interpolate(signal, size=(count, 1), mode="bilinear", align_corners=True)
    weights = _bilinear_weights(torch.tensor([count]), count + 2, grid)[0]  # (count + 2, grid)
    resampled = weights @ signal[0, 0, :, 0]
    torch.testing.assert_close(resampled[:count], expected[0, 0, :, 0], atol=1e-5, rtol=0)
    assert torch.all(resampled[count:] == 0)  # past the image: padding


def test_encoders_satisfy_the_protocol(
    torch_encoder: TorchEncoder, onnx_encoders: dict[str, OnnxEncoder]
) -> None:
    assert torch_encoder.runtime == "torch" and torch_encoder.check is None
    for name, encoder in onnx_encoders.items():
        assert isinstance(encoder, RuntimeEncoder)
        assert encoder.runtime == name
        assert encoder.fingerprint == torch_encoder.fingerprint  # the model's, not the export's
        assert encoder.embedding_dim == torch_encoder.embedding_dim
        assert encoder.max_text_len == torch_encoder.max_text_len
        assert encoder.check is not None and encoder.check.passed
        assert encoder.check.runtime == name
        assert encoder.check.min_cosine >= MIN_COSINE[name]
        assert encoder.check.recall_drop is None  # no check_data
    assert isinstance(torch_encoder, RuntimeEncoder)


def test_second_load_reuses_the_cache(
    model_dir: Path,
    torch_encoder: TorchEncoder,
    onnx_encoders: dict[str, OnnxEncoder],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = export_dir(model_dir, torch_encoder.fingerprint, "onnx-int8")
    mtimes = {path.name: path.stat().st_mtime_ns for path in directory.iterdir()}

    def no_export(*args: object) -> None:
        raise AssertionError("exported again")

    def no_check(*args: object) -> None:
        raise AssertionError("checked again")

    monkeypatch.setattr(runtime_module, "_write_export", no_export)
    monkeypatch.setattr(runtime_module, "run_check", no_check)
    encoder = load_encoder(model_dir, "onnx-int8")
    assert encoder.check == onnx_encoders["onnx-int8"].check
    assert {path.name: path.stat().st_mtime_ns for path in directory.iterdir()} == mtimes


@pytest.mark.parametrize("damage", ["garbage model", "missing manifest", "other fingerprint"])
def test_a_corrupt_cache_is_rebuilt(
    model_dir: Path, torch_encoder: TorchEncoder, tmp_path: Path, damage: str
) -> None:
    load_encoder(model_dir, "onnx", cache_dir=tmp_path)
    directory = export_dir(model_dir, torch_encoder.fingerprint, "onnx", tmp_path)
    if damage == "garbage model":
        (directory / "text.onnx").write_bytes(b"not an onnx model")
    elif damage == "missing manifest":
        (directory / "export.json").unlink()
    else:
        manifest = json.loads((directory / "export.json").read_text())
        manifest["model_fingerprint"] = "0" * 64
        (directory / "export.json").write_text(json.dumps(manifest))
    encoder = load_encoder(model_dir, "onnx", cache_dir=tmp_path)
    vectors = encoder.encode_text(TEXTS[:3])
    assert _cosines(torch_encoder.encode_text(TEXTS[:3]), vectors).min() >= 0.9999
    assert json.loads((directory / "export.json").read_text())["model_fingerprint"] == (
        torch_encoder.fingerprint
    )


def test_the_check_refuses_vectors_that_differ(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encode_text = OnnxEncoder.encode_text

    def perturbed(self: OnnxEncoder, texts: list[str], batch_size: int = 64) -> np.ndarray:
        vectors = encode_text(self, texts, batch_size)
        noise = np.random.default_rng(0).normal(size=vectors.shape).astype(np.float32)
        return vectors + 0.3 * noise

    monkeypatch.setattr(OnnxEncoder, "encode_text", perturbed)
    with pytest.raises(RuntimeUnavailable, match=r"refused.*min cosine 0\.\d+ \(min 0\.99\)"):
        load_encoder(model_dir, "onnx", cache_dir=tmp_path)
    monkeypatch.undo()
    # The failed check is cached with its export: still refused, without checking again.
    with pytest.raises(RuntimeUnavailable, match="refused"):
        load_encoder(model_dir, "onnx", cache_dir=tmp_path)
    (check_file,) = tmp_path.glob(f"*/onnx/{CHECK_FILE}")
    assert json.loads(check_file.read_text())["passed"] is False


def test_the_check_measures_recall_on_check_data(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model.synthetic import PRESETS, write_dataset

    dataset = write_dataset(tmp_path / "synthetic", PRESETS["tiny"])
    dataset_json = dataset if dataset.is_file() else dataset / "dataset.json"
    # fp32: the same ranks as torch (int8 reorders near-ties of this random model's scores).
    encoder = load_encoder(model_dir, "onnx", cache_dir=tmp_path, check_data=dataset_json)
    assert encoder.check is not None and encoder.check.recall_drop is not None
    assert abs(encoder.check.recall_drop) <= 0.5

    monkeypatch.setattr(runtime_check, "recall_drop", lambda *args: 2.5)
    with pytest.raises(RuntimeUnavailable, match=r"recall drop 2\.50 points"):
        load_encoder(model_dir, "onnx-int8", cache_dir=tmp_path, check_data=dataset_json)


def test_missing_onnxruntime_names_the_extra(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime → ImportError
    with pytest.raises(RuntimeUnavailable, match=r"vldeformer\[onnx\]"):
        load_encoder(model_dir, "onnx-int8", cache_dir=tmp_path)
    assert pick_default_runtime(model_dir, cache_dir=tmp_path) == "torch"


def test_default_runtime_prefers_int8(model_dir: Path, onnx_encoders: object) -> None:
    assert pick_default_runtime(model_dir) == "onnx-int8"


def test_bad_arguments(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="'tensorrt'"):
        load_encoder(model_dir, "tensorrt")
    with pytest.raises(RuntimeUnavailable, match="CPU only"):
        load_encoder(model_dir, "onnx", device="cuda")


def _check(runtime: str, passed: bool) -> RuntimeCheck:
    return RuntimeCheck(runtime, "f" * 64, 0.999, 0.9995, None, passed)


@pytest.mark.parametrize(
    ("index_runtime", "serve_runtime", "check", "expected"),
    [
        ("torch", "torch", None, True),
        ("onnx", "onnx", _check("onnx", True), True),
        ("onnx", "torch", None, True),  # the index's runtime passed when it was built
        ("onnx-int8", "torch", None, True),
        ("torch", "onnx", _check("onnx", True), True),
        ("torch", "onnx-int8", _check("onnx-int8", True), True),
        ("onnx", "onnx-int8", _check("onnx-int8", True), True),
        ("onnx-int8", "onnx", _check("onnx", True), True),
        ("torch", "onnx", _check("onnx", False), False),  # failed its check
        ("torch", "onnx-int8", None, False),  # never checked
        ("torch", "onnx-int8", _check("onnx", True), False),  # another runtime's check
        ("torch", "openvino", None, False),
        ("tensorrt", "torch", None, False),
    ],
)
def test_compatible(
    index_runtime: str, serve_runtime: str, check: RuntimeCheck | None, expected: bool
) -> None:
    assert compatible(index_runtime, serve_runtime, check) is expected


def test_runtime_check_round_trips_through_json() -> None:
    check = _check("onnx", True)
    assert RuntimeCheck(**json.loads(json.dumps(dataclasses.asdict(check)))) == check
    assert set(RUNTIMES) == {"torch", "onnx", "onnx-int8"}


@pytest.mark.slow
def test_the_dynamo_exporter_takes_over_without_the_legacy_one(
    model_dir: Path, torch_encoder: TorchEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export = torch.onnx.export

    def dynamo_only(*args: object, **kwargs: object) -> object:
        if not kwargs.get("dynamo"):
            raise RuntimeError("the TorchScript exporter is gone")
        return export(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.onnx, "export", dynamo_only)
    encoder = load_encoder(model_dir, "onnx", cache_dir=tmp_path)
    for batch_size in (1, 4):
        images = torch_encoder.encode_images(_images(), batch_size=batch_size)
        texts = torch_encoder.encode_text(TEXTS, batch_size=batch_size)
        assert _cosines(images, encoder.encode_images(_images(), batch_size)).min() >= 0.9999
        assert _cosines(texts, encoder.encode_text(TEXTS, batch_size)).min() >= 0.9999
