"""The encoders :func:`model.runtime.load_encoder` returns: torch, and ONNX Runtime sessions.

Both offer the :class:`model.runtime.RuntimeEncoder` interface (``encode_text`` /
``encode_images``, ``embedding_dim``, ``fingerprint``, ``max_text_len``, ``runtime``,
``check``) and the tensor level the indexer's image pipeline uses (``tokenize``,
``preprocess``, ``encode_tokens``, ``encode_pixels``, ``image_processor``, ``device``,
``dtype``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from model.modeling import (
    DecomposeSettings,
    VLDeformer,
    _batches,
    preprocess_images,
    tokenize_texts,
)
from model.runtime_check import RuntimeCheck

if TYPE_CHECKING:
    import onnxruntime


class TorchEncoder:
    """:class:`model.VLDeformer` under the :class:`RuntimeEncoder` interface (``network``)."""

    runtime = "torch"
    check: RuntimeCheck | None = None

    def __init__(self, network: VLDeformer) -> None:
        self.network = network

    @property
    def embedding_dim(self) -> int:
        return self.network.embedding_dim

    @property
    def fingerprint(self) -> str:
        return self.network.fingerprint

    @property
    def max_text_len(self) -> int:
        return self.network.settings.max_text_len

    @property
    def device(self) -> torch.device:
        return self.network.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @property
    def image_processor(self) -> Any:
        return self.network.image_processor

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.network.tokenize(texts)

    def preprocess(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network.preprocess(images)

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return self.network.encode_text(texts, batch_size=batch_size)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        return self.network.encode_images(images, batch_size=batch_size)

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.network.encode_tokens(input_ids, attention_mask)

    def encode_pixels(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        return self.network.encode_pixels(pixel_values, pixel_mask)


class OnnxEncoder:
    """The two encoders in ONNX Runtime sessions, behind the :class:`RuntimeEncoder` interface.

    Also offers the tensor-level ``encode_tokens`` / ``encode_pixels`` (CPU tensors in, float32
    ``(B, D)`` tensor out), ``image_processor``, ``device`` and ``dtype``, as the indexer's
    image pipeline uses them.
    """

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(
        self,
        text_session: onnxruntime.InferenceSession,
        image_session: onnxruntime.InferenceSession,
        network: VLDeformer,
        runtime: str,
        check: RuntimeCheck | None = None,
    ) -> None:
        self.text_session = text_session
        self.image_session = image_session
        self.runtime = runtime
        self.check = check
        # From the network, only what preprocessing needs (its weights are not kept).
        self.tokenizer = network.tokenizer
        self.image_processor = network.image_processor
        self.settings: DecomposeSettings = network.settings
        self._fingerprint = network.fingerprint
        self._embedding_dim = network.embedding_dim

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def max_text_len(self) -> int:
        return self.settings.max_text_len

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """As :meth:`VLDeformer.tokenize`: pad, truncate to ``max_text_len``; CPU tensors."""
        return tokenize_texts(self.tokenizer, texts, self.settings.max_text_len)

    def preprocess(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`VLDeformer.preprocess`: padded ``pixel_values`` and ``pixel_mask``."""
        return preprocess_images(self.image_processor, images)

    def _run(
        self, session: onnxruntime.InferenceSession, feeds: dict[str, np.ndarray]
    ) -> np.ndarray:
        (vectors,) = session.run(None, feeds)
        return np.asarray(vectors, dtype=np.float32)

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` token ids and mask → ``(B, D)`` unit rows (float32, CPU)."""
        feeds = {
            "input_ids": input_ids.cpu().numpy().astype(np.int64, copy=False),
            "attention_mask": attention_mask.cpu().numpy().astype(np.int64, copy=False),
        }
        return torch.from_numpy(self._run(self.text_session, feeds))

    def encode_pixels(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` pixels and ``(B, H, W)`` mask → ``(B, D)`` unit rows (float32, CPU)."""
        feeds = {
            "pixel_values": pixel_values.detach().cpu().float().numpy(),
            "pixel_mask": pixel_mask.cpu().numpy().astype(np.int64, copy=False),
        }
        return torch.from_numpy(self._run(self.image_session, feeds))

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Encode texts alone: float32 ``(N, D)``, each row L2-normalised."""
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise TypeError("encode_text expects a list of str")
        out = np.zeros((len(texts), self.embedding_dim), dtype=np.float32)
        for batch in _batches(len(texts), batch_size):
            tokens = self.tokenize(texts[batch])
            out[batch] = self.encode_tokens(tokens["input_ids"], tokens["attention_mask"]).numpy()
        return out

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Encode images alone: float32 ``(N, D)``, each row L2-normalised."""
        out = np.zeros((len(images), self.embedding_dim), dtype=np.float32)
        for batch in _batches(len(images), batch_size):
            pixel_values, pixel_mask = self.preprocess(images[batch])
            out[batch] = self.encode_pixels(pixel_values, pixel_mask).numpy()
        return out
