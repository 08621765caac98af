"""How each evaluation mode scores a gallery of images against its captions.

- :func:`encode_gallery`: decomposed embeddings, one encoder pass per image and per caption;
- :func:`early_scores`: early interaction over *every* (image, caption) pair;
- :func:`hybrid_scores`: each query's decomposed top-K re-scored by early interaction.

Every image is decoded (:class:`Gallery`, timed apart) and preprocessed once per pass; the
joint forward passes reuse its pixels for a whole batch of captions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from model.images import ImageError, collate_pixels, open_image, preprocess_image
from model.modeling import EarlyInteraction, VLDeformer, autocast


class Gallery:
    """The evaluated images, given as PIL images or files decoded on demand (timed apart)."""

    def __init__(self, images: Sequence[Image.Image | str | Path]) -> None:
        self._images = images
        self.decode_seconds = 0.0

    def __len__(self) -> int:
        return len(self._images)

    def load(self, index: int) -> Image.Image:
        item = self._images[index]
        if isinstance(item, Image.Image):
            return item
        start = time.perf_counter()
        try:
            return open_image(item)
        except ImageError as exc:
            raise type(exc)(f"{item} (image {index}): {exc}") from exc
        finally:
            self.decode_seconds += time.perf_counter() - start

    def load_many(self, indices: Sequence[int] | np.ndarray) -> list[Image.Image]:
        return [self.load(int(index)) for index in indices]


class Stopwatch:
    """Wall time minus the gallery's decoding time over the same span."""

    def __init__(self, gallery: Gallery) -> None:
        self._gallery = gallery
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        self._decode_start = self._gallery.decode_seconds
        return self

    def __exit__(self, *exc: object) -> None:
        decoding = self._gallery.decode_seconds - self._decode_start
        self.seconds += time.perf_counter() - self._start - decoding


# ------------------------------------------------------------------------- modes


def encode_gallery(
    model: VLDeformer,
    gallery: Gallery,
    image_indices: np.ndarray,
    captions: Sequence[str],
    batch_size: int,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Decomposed embeddings of the images ``image_indices`` ``(n, D)`` and of ``captions``."""
    image_vectors = np.zeros((len(image_indices), model.embedding_dim), dtype=np.float32)
    for start in tqdm(
        range(0, len(image_indices), batch_size), desc="encode images", disable=not progress
    ):
        batch = image_indices[start : start + batch_size]
        image_vectors[start : start + batch.size] = model.encode_images(
            gallery.load_many(batch), batch_size=batch_size
        )
    text_vectors = model.encode_text(list(captions), batch_size=batch_size)
    return image_vectors, text_vectors


def _tokens(teacher: EarlyInteraction, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Padded tokens of ``texts`` on the teacher's device."""
    return {key: value.to(teacher.device) for key, value in teacher.tokenize(texts).items()}


def _pixels(teacher: EarlyInteraction, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """One image preprocessed once: ``(1, 3, H, W)`` pixels and ``(1, H, W)`` mask on device."""
    pixel_values, pixel_mask = collate_pixels([preprocess_image(teacher.image_processor, image)])
    return pixel_values.to(teacher.device), pixel_mask.to(teacher.device)


def _score_image(
    teacher: EarlyInteraction,
    pixels: tuple[torch.Tensor, torch.Tensor],
    tokens: dict[str, torch.Tensor],
) -> np.ndarray:
    """Early-interaction scores of one preprocessed image against a token batch: ``(B,)``."""
    pixel_values, pixel_mask = pixels
    rows = tokens["input_ids"].shape[0]
    with torch.inference_mode(), autocast(teacher.device):
        logits = teacher.score_tensors(
            tokens["input_ids"],
            tokens["attention_mask"],
            pixel_values.expand(rows, -1, -1, -1),  # (B, 3, H, W), no copy
            pixel_mask.expand(rows, -1, -1),
        )
    return logits.float().cpu().numpy()


def early_scores(
    teacher: EarlyInteraction,
    gallery: Gallery,
    image_indices: np.ndarray,
    captions: Sequence[str],
    batch_size: int,
    progress: bool = False,
) -> np.ndarray:
    """Every image of ``image_indices`` against every caption: ``(n_images, n_captions)``.

    Each image is preprocessed once and each caption tokenised once; the joint forward
    passes run ``batch_size`` pairs at a time.
    """
    starts = range(0, len(captions), batch_size)
    token_batches = [_tokens(teacher, captions[start : start + batch_size]) for start in starts]
    sim = np.zeros((len(image_indices), len(captions)), dtype=np.float32)
    for row, image_index in enumerate(
        tqdm(image_indices, desc="early interaction", disable=not progress)
    ):
        pixels = _pixels(teacher, gallery.load(int(image_index)))
        for start, tokens in zip(starts, token_batches, strict=True):
            sim[row, start : start + batch_size] = _score_image(teacher, pixels, tokens)
    return sim


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's ``k`` best scores ``(rows, k)`` (order within is unspecified)."""
    k = min(k, scores.shape[1])
    if k == scores.shape[1]:
        return np.tile(np.arange(k), (scores.shape[0], 1))
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def _zscore(scores: np.ndarray) -> np.ndarray:
    """Per row: mean 0, standard deviation 1 (rows of equal scores become 0)."""
    centred = scores - scores.mean(axis=1, keepdims=True)
    return centred / np.maximum(centred.std(axis=1, keepdims=True), 1e-12)


def rerank(
    decomposed: np.ndarray,
    candidates: np.ndarray,
    rescored: np.ndarray,
    student_weight: float = 0.0,
) -> np.ndarray:
    """Hybrid scores: candidates above every other item, ordered (ties kept) by ``rescored``.

    ``decomposed`` ``(rows, n)``; ``candidates``/``rescored`` ``(rows, k)``. Non-candidates keep
    their decomposed scores; a candidate gets ``row max + 1 + its tie-preserving rank``.
    With ``student_weight`` w > 0 the candidates are ordered by ``z(rescored) + w *
    z(decomposed)`` instead, each z-scored over the row's candidates (BLIP adds its ITC
    similarity to the matching score the same way); 0 keeps the teacher's order.
    """
    if student_weight:
        student = np.take_along_axis(decomposed, candidates, axis=1)
        rescored = _zscore(rescored.astype(np.float64)) + student_weight * _zscore(
            student.astype(np.float64)
        )
    # float32 stays exact here: max + 1 + a small integer rank never collides or rounds down.
    hybrid = np.array(decomposed, dtype=np.result_type(decomposed.dtype, np.float32))
    floor = hybrid.max(axis=1) + 1.0  # (rows,)
    for row in range(hybrid.shape[0]):
        ordered = np.sort(rescored[row])
        ranks = np.searchsorted(ordered, rescored[row], side="left")  # ties share a rank
        hybrid[row, candidates[row]] = floor[row] + ranks
    return hybrid


def hybrid_scores(
    teacher: EarlyInteraction,
    gallery: Gallery,
    image_indices: np.ndarray,
    captions: Sequence[str],
    decomposed_i2t: np.ndarray,
    rerank_k: int,
    batch_size: int,
    progress: bool = False,
    student_weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Re-rank each query's decomposed top ``rerank_k`` with early interaction.

    Returns the hybrid ``sim_i2t`` ``(n_images, n_captions)``, ``sim_t2i`` ``(n_captions,
    n_images)`` and the number of distinct pairs scored. Pairs are visited image by image, so
    each image is decoded and preprocessed once and a pair that is a candidate in both
    directions is scored once.
    """
    n_images, n_captions = decomposed_i2t.shape
    i2t_candidates = top_k(decomposed_i2t, rerank_k)  # (n_images, k)
    t2i_candidates = top_k(decomposed_i2t.T, rerank_k)  # (n_captions, k)
    wanted = np.zeros((n_images, n_captions), dtype=bool)  # pairs to score, image-major
    wanted[np.arange(n_images)[:, None], i2t_candidates] = True
    wanted[t2i_candidates, np.arange(n_captions)[:, None]] = True
    early = np.full((n_images, n_captions), np.nan, dtype=np.float32)
    for row in tqdm(range(n_images), desc="hybrid re-rank", disable=not progress):
        caption_indices = np.flatnonzero(wanted[row])
        pixels = _pixels(teacher, gallery.load(int(image_indices[row])))
        for start in range(0, caption_indices.size, batch_size):
            batch = caption_indices[start : start + batch_size]
            tokens = _tokens(teacher, [captions[c] for c in batch])
            early[row, batch] = _score_image(teacher, pixels, tokens)
    i2t_rescored = np.take_along_axis(early, i2t_candidates, axis=1)
    t2i_rescored = np.take_along_axis(early.T, t2i_candidates, axis=1)
    sim_i2t = rerank(decomposed_i2t, i2t_candidates, i2t_rescored, student_weight)
    sim_t2i = rerank(decomposed_i2t.T, t2i_candidates, t2i_rescored, student_weight)
    return sim_i2t, sim_t2i, int(wanted.sum())
