"""Export a VLDeformer's two encoders to ONNX, and quantize an export to int8.

Only the network is exported: tokenisation and image preprocessing
(:func:`model.images.preprocess_image`, :func:`model.images.collate_pixels`) stay the torch
path's, so a runtime sees exactly the tensors :meth:`model.VLDeformer.encode_tokens` and
:meth:`model.VLDeformer.encode_pixels` see.

- text:  ``input_ids`` int64 ``(B, T)``, ``attention_mask`` int64 ``(B, T)`` → ``embeddings``
  float32 ``(B, D)``, unit rows; dynamic ``B`` and ``T``.
- image: ``pixel_values`` float32 ``(B, 3, H, W)``, ``pixel_mask`` int64 ``(B, H, W)`` →
  ``embeddings`` float32 ``(B, D)``, unit rows; dynamic ``B``, ``H`` and ``W``.

ViLT's ``visual_embed`` cannot be exported as written: it interpolates the position
embeddings to each image's own patch grid in a Python loop, then gathers the valid patches
with ``nonzero`` and pads the rest with randomly drawn ones. :class:`ImageEncoderGraph`
computes the same thing with fixed-shape tensor ops: every patch of the padded grid stays in
place (its mask says which are real), and the per-image bilinear interpolation
(``align_corners=True``) is a pair of weight matrices built from each image's row and column
counts. Attention ignores masked positions and is indifferent to their order, so the pooled
vector is the torch path's up to float rounding (checked by the export-time check).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.modeling import VLDeformer

logger = logging.getLogger(__name__)

OPSET = 17
TEXT_INPUTS = ("input_ids", "attention_mask")
IMAGE_INPUTS = ("pixel_values", "pixel_mask")
OUTPUT = "embeddings"


class TextEncoderGraph(nn.Module):
    """:meth:`VLDeformer.encode_tokens` as a module, for export."""

    def __init__(self, model: VLDeformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_tokens(input_ids, attention_mask)  # (B, D)


def _bilinear_weights(counts: torch.Tensor, length: int, grid: int) -> torch.Tensor:
    """``(B, length, grid)`` weights that resample a ``grid``-long axis to ``counts[b]``
    positions (bilinear, ``align_corners=True``, as ``F.interpolate``); rows past ``counts[b]``
    are zero (ViLT pads the interpolated embeddings with zeros)."""
    positions = torch.arange(length, device=counts.device, dtype=torch.float32)[None]  # (1, L)
    counts_f = counts.to(torch.float32)[:, None]  # (B, 1)
    # align_corners: output i samples source i * (grid - 1) / (count - 1); a count of 1 samples 0.
    scale = (grid - 1) / (counts_f - 1).clamp(min=1.0)
    source = (positions * scale).clamp(max=grid - 1)  # (B, L)
    lower = source.floor()
    fraction = (source - lower)[..., None]  # (B, L, 1)
    lower_index = lower.long()[..., None]
    upper_index = (lower_index + 1).clamp(max=grid - 1)
    taps = torch.arange(grid, device=counts.device)  # (G,)
    weights = (1.0 - fraction) * (taps == lower_index).float() + fraction * (
        taps == upper_index
    ).float()  # (B, L, G)
    inside = (positions < counts_f).float()[..., None]  # (B, L, 1)
    return weights * inside


def _grid_size(config: Any) -> int:
    """Patches per side of the pretraining image: the grid of ViLT's position embeddings."""
    return int(config.image_size) // int(config.patch_size)


class ImageEncoderGraph(nn.Module):
    """:meth:`VLDeformer.encode_pixels` at inference (every patch), in exportable ops."""

    def __init__(self, model: VLDeformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.vilt.embeddings
        config = self.model.vilt.config
        patches = embeddings.patch_embeddings(pixel_values)  # (B, D, Hp, Wp)
        batch, width, rows, cols = patches.shape
        # ViLT's patch mask: the pixel mask resized (nearest) to the patch grid.
        patch_mask = F.interpolate(pixel_mask[:, None].float(), size=(rows, cols)).long()[:, 0]
        valid_rows = patch_mask[:, :, 0].sum(1)  # (B,) as ViLT counts them: column 0, row 0
        valid_cols = patch_mask[:, 0, :].sum(1)  # (B,)
        grid = _grid_size(config)
        spatial = embeddings.position_embeddings[0, 1:, :].transpose(0, 1)  # (D, G*G)
        spatial = spatial.reshape(1, width, grid, grid)  # (1, D, G, G)
        row_weights = _bilinear_weights(valid_rows, rows, grid)[:, None]  # (B, 1, Hp, G)
        col_weights = _bilinear_weights(valid_cols, cols, grid)[:, None]  # (B, 1, Wp, G)
        position = row_weights @ spatial @ col_weights.transpose(-1, -2)  # (B, D, Hp, Wp)
        hidden = (patches + position).flatten(2).transpose(1, 2)  # (B, Hp*Wp, D)
        cls = embeddings.cls_token + embeddings.position_embeddings[:, :1, :]  # (1, 1, D)
        hidden = torch.cat([cls.expand(batch, -1, -1), hidden], dim=1)  # (B, 1+P, D)
        mask = torch.cat([torch.ones_like(patch_mask[:, :1, 0]), patch_mask.flatten(1)], dim=1)
        hidden = hidden + embeddings.token_type_embeddings(torch.ones_like(mask))
        return self.model._encode(hidden, mask)  # (B, D)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The exporters warn about tracing and deprecation at length; none of it is actionable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export(
    graph: nn.Module,
    example: tuple[torch.Tensor, torch.Tensor],
    input_names: tuple[str, str],
    dynamic_axes: dict[str, dict[int, str]],
    path: Path,
) -> None:
    """TorchScript exporter first (sub-second, no onnxscript needed); torch's dynamo
    exporter where that one is gone or fails."""
    graph.eval()
    legacy: dict[str, Any] = {
        "dynamic_axes": {**dynamic_axes, OUTPUT: {0: "batch"}},
        "opset_version": OPSET,
        "dynamo": False,
    }
    dynamo: dict[str, Any] = {
        "dynamic_shapes": {
            name: {axis: torch.export.Dim.AUTO for axis in axes}
            for name, axes in dynamic_axes.items()
        },
        "opset_version": max(OPSET, 18),
        "dynamo": True,
        "external_data": False,
    }
    for options in (legacy, dynamo):
        try:
            with _quiet_export(), torch.no_grad():
                torch.onnx.export(
                    graph,
                    example,
                    str(path),
                    input_names=list(input_names),
                    output_names=[OUTPUT],
                    **options,
                )
            return
        except Exception as exc:  # the legacy exporter gone or failing: try the other one
            if options is dynamo:
                raise
            logger.info("TorchScript ONNX export failed (%s); trying the dynamo exporter", exc)


def export_text_encoder(model: VLDeformer, path: Path) -> Path:
    """Write the text encoder to ``path`` (dynamic batch and sequence)."""
    tokens = model.tokenize(["a red circle", "two small shapes left of a big blue square"])
    axes = {name: {0: "batch", 1: "sequence"} for name in TEXT_INPUTS}
    _export(
        TextEncoderGraph(model),
        (tokens["input_ids"], tokens["attention_mask"]),
        TEXT_INPUTS,
        axes,
        path,
    )
    return path


def export_image_encoder(model: VLDeformer, path: Path) -> Path:
    """Write the image encoder to ``path`` (dynamic batch, height and width)."""
    from PIL import Image

    size = int(model.vilt.config.image_size)  # type: ignore[arg-type]
    # Two shapes, so the example batch has padding and the mask path is traced.
    images = [Image.new("RGB", (size, size), "red"), Image.new("RGB", (2 * size, size), "blue")]
    pixel_values, pixel_mask = model.preprocess(images)
    axes = {
        "pixel_values": {0: "batch", 2: "height", 3: "width"},
        "pixel_mask": {0: "batch", 1: "height", 2: "width"},
    }
    _export(ImageEncoderGraph(model), (pixel_values, pixel_mask), IMAGE_INPUTS, axes, path)
    return path


def quantize_int8(source: Path, target: Path) -> Path:
    """Dynamic int8 quantization (QInt8 weights, MatMul and Gemm) of an fp32 export."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs every tensor it skips to the root logger; silence it for the call.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with _quiet_export():
            quantize_dynamic(
                str(source),
                str(target),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
    finally:
        root.setLevel(level)
    return target
