"""VLDeformer on ViLT: one transformer, decomposed into an image encoder and a text encoder.

ViLT is single-stream: text tokens and image patches go through one transformer together,
so scoring a caption against N images costs N forward passes (:class:`EarlyInteraction`).
VLDeformer (Zhang et al., arXiv 2110.11338) fine-tunes the *same* weights with a contrastive
loss (``model.loss``) so the transformer can read a text alone or an image alone:

- text  = ViLT text embeddings  + modality-type embedding 0 → shared encoder → pooled vector
- image = ViLT patch embeddings + modality-type embedding 1 → shared encoder → pooled vector

Retrieval is then one encoder pass per query plus a nearest-neighbour search over vectors
computed offline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import ViltForImageAndTextRetrieval, ViltModel

from model.backbone import (
    CheckpointError,
    check_loading_info,
    load_image_processor,
    load_tokenizer,
    load_vilt_config,
    quiet_transformers,
    resolve_device,
)
from model.images import collate_pixels, preprocess_image

logger = logging.getLogger(__name__)

SETTINGS_FILE = "vldeformer.json"
FORMAT_VERSION = 1
POOLINGS: tuple[str, ...] = ("cls", "mean")


@dataclass(frozen=True)
class DecomposeSettings:
    """How the decomposed encoders read their input; saved as ``vldeformer.json``."""

    # Pooling. "cls": the first token ([CLS] for text, ViLT's image [CLS] for images) after
    # the final LayerNorm, through ViLT's own pretrained pooler (dense + tanh). No new
    # projection head: the pooler was trained on image-text matching, so it is the best
    # starting point, and every weight of the decomposed model is a ViLT weight.
    # "mean": the paper's released code — the mean over every (unmasked) position after the
    # final LayerNorm, then tanh; the pooler's dense layer is not used.
    pooling: str = "cls"
    # Contrastive temperature used in training (the paper's code uses 0.005).
    temperature: float = 0.005
    # ViLT's text position embeddings cover 40 tokens.
    max_text_len: int = 40
    # Patches sampled per image while training (ViLT pretraining samples 200); -1 = all.
    # Inference always uses every patch.
    train_max_image_patches: int = -1

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise CheckpointError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecomposeSettings:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(
                f"unknown decomposition settings {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**data)


def _extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1/0 mask → (B, 1, 1, T) additive attention bias."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on GPU, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def weights_fingerprint(
    config: dict[str, Any], settings: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> str:
    """sha256 over the config, the settings and every tensor (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _config_for_fingerprint(vilt: ViltModel) -> dict[str, Any]:
    config = vilt.config.to_dict()
    # Fields that describe how transformers loaded the model, not what the model computes.
    for volatile in (
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_name_or_path",
        "architectures",
    ):
        config.pop(volatile, None)
    return config


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_len: int) -> dict[str, torch.Tensor]:
    """Texts → padded ``input_ids`` and ``attention_mask`` (B, T), truncated to ``max_len``;
    the one tokenisation every runtime shares (CPU tensors)."""
    encoded = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt"
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def preprocess_images(
    image_processor: Any, images: Sequence[Image.Image]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (any mode) → padded ``pixel_values`` (B, 3, H, W) and ``pixel_mask`` (B, H, W);
    the one preprocessing every runtime shares."""
    return collate_pixels(
        [preprocess_image(image_processor, image.convert("RGB")) for image in images]
    )


class VLDeformer(nn.Module):
    """A ViLT whose one set of transformer weights encodes images and texts *separately*.

    Public API: :meth:`encode_text` and :meth:`encode_images` return L2-normalised float32
    ``(N, D)`` arrays, ``D = hidden_size`` (768 for ViLT-B/32). The tensor-level
    :meth:`encode_tokens` / :meth:`encode_pixels` serve the trainer and the indexer.
    """

    def __init__(
        self,
        vilt: ViltModel,
        tokenizer: Any,
        image_processor: Any,
        settings: DecomposeSettings | None = None,
    ) -> None:
        super().__init__()
        if vilt.pooler is None:
            raise CheckpointError("the ViLT model has no pooler; VLDeformer pools through it")
        self.vilt = vilt
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.settings = settings or DecomposeSettings()
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> VLDeformer:
        """Load a plain ViLT checkpoint (the start of decomposition) or a decomposed one.

        A plain ViLT directory (``ViltModel``, ``ViltForMaskedLM``, ``ViltForImageAndTextRetrieval``…)
        gets default :class:`DecomposeSettings`; one of ours carries ``vldeformer.json``.
        Raises :class:`model.backbone.CheckpointError` naming what was found and expected.
        """
        load_vilt_config(path_or_id)
        settings = DecomposeSettings()
        settings_file = Path(path_or_id) / SETTINGS_FILE
        if settings_file.is_file():
            try:
                saved = json.loads(settings_file.read_text(encoding="utf-8"))
                settings = DecomposeSettings.from_dict(saved["settings"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{settings_file} is corrupt: {exc}") from exc
        try:
            with quiet_transformers():
                loaded: Any = ViltModel.from_pretrained(str(path_or_id), output_loading_info=True)
                vilt, info = loaded
        except Exception as exc:  # safetensors, torch and OS errors alike mean "bad weights"
            raise CheckpointError(
                f"cannot load the ViLT weights of {path_or_id} (expected model.safetensors or "
                f"pytorch_model.bin that match config.json): {exc}"
            ) from exc
        check_loading_info(path_or_id, info)
        model = cls(vilt, load_tokenizer(path_or_id), load_image_processor(path_or_id), settings)
        model.eval()
        model._fingerprint = model.compute_fingerprint()  # before any dtype cast
        model.to(device=resolve_device(device), dtype=dtype)
        return model

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write a self-contained checkpoint: HF config + safetensors + tokenizer + image processor
        + ``vldeformer.json`` (settings, embedding dimension, fingerprint)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with quiet_transformers():
            self.vilt.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        self._fingerprint = self.compute_fingerprint()
        payload = {
            "format": "vldeformer",
            "format_version": FORMAT_VERSION,
            "settings": self.settings.to_dict(),
            "embedding_dim": self.embedding_dim,
            "fingerprint": self._fingerprint,
        }
        (out / SETTINGS_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        return out

    def compute_fingerprint(self) -> str:
        state = {name: tensor.float() for name, tensor in self.vilt.state_dict().items()}
        return weights_fingerprint(
            _config_for_fingerprint(self.vilt), self.settings.to_dict(), state
        )

    @property
    def fingerprint(self) -> str:
        """Stable sha256 of config, settings and weights (as loaded or last saved)."""
        if self._fingerprint is None:
            self._fingerprint = self.compute_fingerprint()
        return self._fingerprint

    @property
    def embedding_dim(self) -> int:
        return int(self.vilt.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ tensor level
    def _encode(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Shared encoder over one modality's tokens → pooled, normalised (B, D)."""
        bias = _extended_mask(mask, hidden_states.dtype)  # (B, 1, 1, T)
        hidden_states = self.vilt.encoder(hidden_states, attention_mask=bias).last_hidden_state
        hidden_states = self.vilt.layernorm(hidden_states)  # (B, T, D)
        if self.settings.pooling == "mean":
            weights = mask.to(hidden_states.dtype)[:, :, None]  # (B, T, 1)
            mean = (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            return F.normalize(torch.tanh(mean).float(), dim=-1)
        assert self.vilt.pooler is not None  # checked in __init__
        pooled = self.vilt.pooler(hidden_states)  # (B, D): first token → dense → tanh
        return F.normalize(pooled.float(), dim=-1)

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only forward: ``(B, T)`` token ids and mask → ``(B, D)`` unit rows."""
        embeddings = self.vilt.embeddings
        hidden = embeddings.text_embeddings(input_ids=input_ids)  # (B, T, D)
        hidden = hidden + embeddings.token_type_embeddings(torch.zeros_like(input_ids))
        return self._encode(hidden, attention_mask)

    def encode_pixels(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        """Image-only forward: ``(B, 3, H, W)`` pixels and ``(B, H, W)`` mask → ``(B, D)`` unit rows.

        Padding pixels (mask 0) are excluded from attention. While training, at most
        ``settings.train_max_image_patches`` patches are sampled per image; at inference all.
        """
        embeddings = self.vilt.embeddings
        max_patches = self.settings.train_max_image_patches if self.training else -1
        hidden, mask, _ = embeddings.visual_embed(
            pixel_values, pixel_mask, max_image_length=max_patches
        )
        hidden = hidden + embeddings.token_type_embeddings(torch.ones_like(mask))  # (B, 1+P, D)
        return self._encode(hidden, mask)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise, pad and truncate to ``settings.max_text_len``; tensors on CPU."""
        return tokenize_texts(self.tokenizer, texts, self.settings.max_text_len)

    def preprocess(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB images → padded ``pixel_values`` (B, 3, H, W) and ``pixel_mask`` (B, H, W)."""
        return preprocess_images(self.image_processor, images)

    # ------------------------------------------------------------------ numpy level
    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Encode texts alone: float32 ``(N, D)``, each row L2-normalised."""
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise TypeError("encode_text expects a list of str")
        out = np.zeros((len(texts), self.embedding_dim), dtype=np.float32)
        device = self.device
        with torch.inference_mode(), autocast(device):
            for batch in _batches(len(texts), batch_size):
                tokens = self.tokenize(texts[batch])
                vectors = self.encode_tokens(
                    tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
                )
                out[batch] = vectors.float().cpu().numpy()
        return out

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Encode images alone: float32 ``(N, D)``, each row L2-normalised."""
        out = np.zeros((len(images), self.embedding_dim), dtype=np.float32)
        device = self.device
        with torch.inference_mode(), autocast(device):
            for batch in _batches(len(images), batch_size):
                pixel_values, pixel_mask = self.preprocess(images[batch])
                vectors = self.encode_pixels(pixel_values.to(device), pixel_mask.to(device))
                out[batch] = vectors.float().cpu().numpy()
        return out


class EarlyInteraction(nn.Module):
    """The undecomposed ViLT: scores each (text, image) pair from one joint forward pass.

    The paper's baseline and the re-ranker of the fast path's top results. Always loaded from
    the original (teacher) checkpoint — decomposition changes the shared weights — and needs
    its image-text retrieval head (``rank_output``, as in ``ViltForImageAndTextRetrieval``).
    """

    def __init__(
        self, network: ViltForImageAndTextRetrieval, tokenizer: Any, image_processor: Any
    ) -> None:
        super().__init__()
        self.network = network
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_text_len = int(network.config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> EarlyInteraction:
        load_vilt_config(path_or_id)
        if (Path(path_or_id) / SETTINGS_FILE).is_file():
            raise CheckpointError(
                f"{path_or_id} is a decomposed VLDeformer checkpoint; early interaction needs the "
                "original (teacher) ViLT checkpoint with its retrieval head"
            )
        try:
            with quiet_transformers():
                loaded: Any = ViltForImageAndTextRetrieval.from_pretrained(
                    str(path_or_id), output_loading_info=True
                )
                network, info = loaded
        except Exception as exc:  # safetensors, torch and OS errors alike mean "bad weights"
            raise CheckpointError(f"cannot load the ViLT weights of {path_or_id}: {exc}") from exc
        if any(key.startswith("rank_output") for key in info.get("missing_keys", [])):
            raise CheckpointError(
                f"{path_or_id} has no image-text retrieval head (rank_output); expected a "
                "ViltForImageAndTextRetrieval checkpoint such as dandelin/vilt-b32-finetuned-coco"
            )
        check_loading_info(path_or_id, info)
        model = cls(network, load_tokenizer(path_or_id), load_image_processor(path_or_id))
        model.eval()
        model.to(device=resolve_device(device), dtype=dtype)
        return model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the checkpoint in the Hugging Face layout (weights, tokenizer, image processor)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with quiet_transformers():
            self.network.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        return out

    def score_tensors(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Joint forward of B aligned (text, image) pairs → ``(B,)`` matching logits."""
        output = self.network(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            pixel_mask=pixel_mask,
        )
        return output.logits[:, 0]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def score_pairs(
        self, texts: Sequence[str], images: Sequence[Image.Image], batch_size: int = 64
    ) -> np.ndarray:
        """Score ``texts[i]`` against ``images[i]``: float32 ``(N,)``, higher = better match."""
        if len(texts) != len(images):
            raise ValueError(
                f"score_pairs needs as many texts as images, got {len(texts)} and {len(images)}"
            )
        out = np.zeros(len(texts), dtype=np.float32)
        device = self.device
        with torch.inference_mode(), autocast(device):
            for batch in _batches(len(texts), batch_size):
                tokens = self.tokenize(texts[batch])
                pixel_values, pixel_mask = preprocess_images(self.image_processor, images[batch])
                scores = self.score_tensors(
                    tokens["input_ids"].to(device),
                    tokens["attention_mask"].to(device),
                    pixel_values.to(device),
                    pixel_mask.to(device),
                )
                out[batch] = scores.float().cpu().numpy()
        return out
