"""Fixtures: a published fake-model index in tmp_path and TestClients over apps built on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.helpers import FakeEncoder, Gallery, make_gallery

TOKEN = "test-reload-token-0123456789"


@dataclass
class ServiceEnv:
    root: Path
    images_dir: Path
    model_dir: Path
    encoder: FakeEncoder
    gallery: Gallery

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_dir": self.model_dir,
            "index_root": self.root,
            "device": "cpu",
            "batch_window_ms": 2.0,
        }
        values.update(overrides)
        return Settings(**values)


def _service_env(base: Path) -> ServiceEnv:
    encoder = FakeEncoder()
    model_dir = base / "model"
    model_dir.mkdir()
    root = base / "index"
    gallery = make_gallery(root, base / "gallery", encoder)
    return ServiceEnv(root, base / "gallery", model_dir, encoder, gallery)


@pytest.fixture
def service_env(tmp_path: Path) -> ServiceEnv:
    """A fresh published fake-model index (tests may change it)."""
    return _service_env(tmp_path)


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory: pytest.TempPathFactory) -> ServiceEnv:
    """One index per module, for tests that only read it."""
    return _service_env(tmp_path_factory.mktemp("shared-service"))


@pytest.fixture(scope="module")
def shared_client(shared_env: ServiceEnv) -> Iterator[TestClient]:
    """One started app per module over :func:`shared_env`, for tests that change nothing."""
    encoder = shared_env.encoder
    app = create_app(shared_env.settings(), load_encoder=lambda s: encoder)
    with TestClient(app, raise_server_exceptions=False) as started:
        yield started


@pytest.fixture
def make_client(service_env: ServiceEnv) -> Iterator[Callable[..., TestClient]]:
    """``make_client(encoder=None, **settings)`` → a started TestClient (closed at teardown)."""
    with ExitStack() as stack:

        def build(encoder: Any = None, **overrides: Any) -> TestClient:
            chosen = encoder if encoder is not None else service_env.encoder
            app = create_app(service_env.settings(**overrides), load_encoder=lambda s: chosen)
            return stack.enter_context(TestClient(app, raise_server_exceptions=False))

        yield build


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@dataclass
class TinyModelEnv:
    """The tiny random ViLT and an index of its own vectors over a small generated gallery."""

    model_dir: Path
    root: Path
    gallery: Gallery
    model: Any  # model.runtime.TorchEncoder

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_dir": self.model_dir,
            "index_root": self.root,
            "device": "cpu",
            "batch_window_ms": 2.0,
        }
        values.update(overrides)
        return Settings(**values)


@pytest.fixture(scope="session")
def tiny_model_env(tiny_vilt_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModelEnv:
    """An index published with the writer from the tiny model's own embeddings (no indexer run)."""
    from PIL import Image

    from model.runtime import load_encoder
    from tests.service.helpers import publish_vectors

    model = load_encoder(tiny_vilt_dir, "torch", device="cpu")
    base = tmp_path_factory.mktemp("tiny-service")
    images_dir = base / "gallery"
    images_dir.mkdir()
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    ids, paths, pictures = [], [], []
    for i, colour in enumerate(colours):
        picture = Image.new("RGB", (32, 32), "white")
        picture.paste(colour, (4 + i * 3, 4, 20 + i * 2, 28))
        path = images_dir / f"{colour}.png"
        picture.save(path)
        ids.append(path.name)
        paths.append(path)
        pictures.append(picture)
    captions = [(f"c{i}", f"a {colour} square", ids[i]) for i, colour in enumerate(colours)]
    root = base / "index"
    version = publish_vectors(
        root,
        fingerprint=model.fingerprint,
        image_ids=ids,
        image_paths=paths,
        image_vectors=model.encode_images(pictures),
        captions=captions,
        caption_vectors=model.encode_text([c[1] for c in captions]),
    )
    return TinyModelEnv(tiny_vilt_dir, root, Gallery(version, ids, paths, captions), model)
