"""The export-time check (:class:`RuntimeCheck`): a runtime's vectors against torch fp32.

The sample is generated in memory (no files): 64 synthetic captions and 16 rendered synthetic
scenes at four aspect ratios, so the check covers padded batches of texts and of images.
With a synthetic dataset (``check_data``: its ``dataset.json``), the check also compares
mean recall on the test split; without one it records ``recall_drop = None``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

MIN_COSINE = 0.99  # below this on any sample vector, a runtime is refused
MAX_RECALL_DROP = 0.5  # mean recall points (percent) on the synthetic test split
SAMPLE_SEED = 11
SAMPLE_IMAGES = 16
SAMPLE_CAPTIONS_PER_IMAGE = 4  # 64 captions
CHECK_MAX_IMAGES = 1000  # images of check_data's test split used for the recall comparison


class Encodes(Protocol):
    @property
    def fingerprint(self) -> str: ...

    def encode_text(self, texts: list[str], batch_size: int = ...) -> np.ndarray: ...

    def encode_images(self, images: list[Image.Image], batch_size: int = ...) -> np.ndarray: ...


@dataclass(frozen=True)
class RuntimeCheck:
    """The export-time check of a runtime against torch fp32, stored next to the export.

    ``min_cosine`` / ``mean_cosine``: over the check sample's 80 vectors (64 captions, 16
    images). ``recall_drop``: mean recall points lost on a synthetic test split, ``None`` when
    no dataset was given. ``passed``: min cosine >= 0.99 and recall drop <= 0.5 (when measured).
    """

    runtime: str
    model_fingerprint: str
    min_cosine: float
    mean_cosine: float
    recall_drop: float | None
    passed: bool

    def describe(self) -> str:
        recall = (
            "recall not measured (no check_data)"
            if self.recall_drop is None
            else f"recall drop {self.recall_drop:.2f} points (max {MAX_RECALL_DROP})"
        )
        return (
            f"min cosine {self.min_cosine:.5f} (min {MIN_COSINE}), mean cosine "
            f"{self.mean_cosine:.5f}, {recall}"
        )


def check_sample() -> tuple[list[str], list[Image.Image]]:
    """64 captions and 16 images (64x64, 96x64, 64x112 and 40x64 pixels), always the same."""
    from model.synthetic import SyntheticConfig, generate, render

    config = SyntheticConfig(
        seed=SAMPLE_SEED,
        n_train=0,
        n_val=0,
        n_test=SAMPLE_IMAGES,
        captions_per_image=SAMPLE_CAPTIONS_PER_IMAGE,
        partial_captions=0,
    )
    examples = generate(config)
    captions = [caption for example in examples for caption in example.captions]
    sizes = ((64, 64), (96, 64), (64, 112), (40, 64))  # (width, height)
    images = [
        render(example.scene, 64).resize(sizes[i % len(sizes)], Image.Resampling.BICUBIC)
        for i, example in enumerate(examples)
    ]
    return captions, images


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``candidate`` with the same row of ``reference``: ``(N,)``."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: reference {reference.shape}, candidate {candidate.shape}")
    reference = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    candidate = candidate / np.maximum(np.linalg.norm(candidate, axis=1, keepdims=True), 1e-12)
    return np.sum(reference * candidate, axis=1)


def sample_cosines(reference: Encodes, candidate: Encodes) -> np.ndarray:
    """Per-vector cosines over the check sample, captions then images: ``(80,)``."""
    captions, images = check_sample()
    text = row_cosines(
        reference.encode_text(captions, batch_size=16), candidate.encode_text(captions, 16)
    )
    image = row_cosines(
        reference.encode_images(images, batch_size=8), candidate.encode_images(images, 8)
    )
    return np.concatenate([text, image])


def mean_recall(
    encoder: Encodes,
    images: Sequence[Image.Image],
    captions: list[str],
    caption_to_image: np.ndarray,
) -> float:
    """Mean of R@1/5/10 in both directions (percent), as the eval CLI reports it."""
    from model.metrics import retrieval_metrics

    image_vectors = encoder.encode_images(list(images), batch_size=32)
    text_vectors = encoder.encode_text(captions, batch_size=64)
    return retrieval_metrics(image_vectors @ text_vectors.T, caption_to_image)["mean_recall"]


def recall_drop(reference: Encodes, candidate: Encodes, check_data: str | Path) -> float:
    """Mean recall points lost on ``check_data``'s test split (positive = worse than torch)."""
    from model.evaluate import load_gallery
    from model.images import open_image

    paths, captions, caption_to_image = load_gallery(
        Path(check_data), split="test", max_images=CHECK_MAX_IMAGES
    )
    images = [open_image(path) for path in paths]
    before = mean_recall(reference, images, captions, caption_to_image)
    after = mean_recall(candidate, images, captions, caption_to_image)
    logger.info("recall check on %s: torch %.2f, runtime %.2f", check_data, before, after)
    return before - after


def run_check(
    reference: Encodes, candidate: Encodes, runtime: str, check_data: str | Path | None
) -> RuntimeCheck:
    """Compare ``candidate`` with torch fp32 on the check sample (and ``check_data``)."""
    cosines = sample_cosines(reference, candidate)
    drop = None if check_data is None else recall_drop(reference, candidate, check_data)
    if check_data is None:
        logger.info("%s check: no check_data given, recall drop not measured", runtime)
    passed = bool(cosines.min() >= MIN_COSINE) and (drop is None or drop <= MAX_RECALL_DROP)
    return RuntimeCheck(
        runtime=runtime,
        model_fingerprint=reference.fingerprint,
        min_cosine=float(cosines.min()),
        mean_cosine=float(cosines.mean()),
        recall_drop=None if drop is None else float(drop),
        passed=passed,
    )
