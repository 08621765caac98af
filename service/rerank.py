"""Re-ranking a shortlist with the early-interaction teacher (:class:`model.EarlyInteraction`).

The decomposed encoders find a shortlist by cosine similarity; the teacher then scores each
(text, image) pair in one joint forward pass and the shortlist is re-ordered by that logit.
Candidate gallery images are decoded with the same safe decoder as uploads
(:func:`model.images.open_image`) and preprocessed with the one preprocessing function
(:func:`model.images.preprocess_image`); their pixels are kept in a bounded LRU cache, since
popular images come back in many shortlists.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from model.files import file_sha256
from model.images import ImageError, collate_pixels, open_image, preprocess_image
from service.retrieval import RecordT, Scored

if TYPE_CHECKING:
    from model import EarlyInteraction

logger = logging.getLogger(__name__)

MAX_RERANK_K = 100  # the largest shortlist a request may ask the teacher to score
DEFAULT_RERANK_K = 20
PAIRS_PER_PASS = 64  # most (text, image) pairs in one teacher forward pass
MAX_WAITING = 16  # re-rank requests admitted (running + waiting); beyond: retrieval order
WEIGHTS_FILE = "model.safetensors"


def teacher_fingerprint(teacher_dir: Path) -> str:
    """sha256 (hex) of the teacher's ``model.safetensors``."""
    return file_sha256(teacher_dir / WEIGHTS_FILE)


class PixelCache:
    """A thread-safe LRU of preprocessed pixels (float32 ``(3, H, W)``), bounded both in
    entries (``capacity``) and in bytes (``max_bytes``: a 384x640 ViLT image is ~2.9 MiB)."""

    def __init__(self, capacity: int, max_bytes: int = 512 << 20) -> None:
        if capacity < 1:
            raise ValueError(f"the pixel cache needs a capacity of at least 1, got {capacity}")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            pixels = self._entries.get(key)
            if pixels is not None:
                self._entries.move_to_end(key)
            return pixels

    def put(self, key: str, pixels: np.ndarray) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._entries[key] = pixels
            self.nbytes += pixels.nbytes
            while len(self._entries) > 1 and (
                len(self._entries) > self.capacity or self.nbytes > self.max_bytes
            ):
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes


def rerank_order(
    shortlist: Sequence[Scored[RecordT]], teacher_scores: Sequence[float | None]
) -> list[Scored[RecordT]]:
    """The shortlist by teacher logit, best first; unscored results (None) after, in order."""
    results: list[Scored[RecordT]] = [
        replace(result, teacher_score=score)
        for result, score in zip(shortlist, teacher_scores, strict=True)
    ]
    scored: list[Scored[RecordT]] = [r for r in results if r.teacher_score is not None]
    scored.sort(key=lambda r: -(r.teacher_score or 0.0))  # stable: ties keep cosine order
    scored.extend(r for r in results if r.teacher_score is None)
    return scored


async def rerank_shortlist(
    results: Sequence[Scored[RecordT]],
    rerank_k: int,
    score_records: Callable[[list[RecordT]], Sequence[float | None]],
    observe_seconds: Callable[[float], None],
    reranker: Reranker,
) -> tuple[list[Scored[RecordT]], bool]:
    """Re-rank stage: the first ``rerank_k`` results by teacher logit, the rest in retrieval
    order; ``(results, reranked)``. Scoring runs on the reranker's own teacher thread (never
    the shared pool that searches and uploads use); when ``MAX_WAITING`` re-ranks are already
    admitted, or the teacher fails (logged), the answer is in retrieval order with
    ``reranked`` false — re-ranking degrades, retrieval keeps serving."""
    shortlist: list[Scored[RecordT]] = list(results[:rerank_k])
    if not shortlist:
        return list(results), False
    if not reranker.admit():
        logger.info("re-rank queue full (%d): answering in retrieval order", MAX_WAITING)
        return list(results), False
    started = time.perf_counter()
    try:
        records = [r.record for r in shortlist]
        teacher_scores: Sequence[float | None] = await asyncio.get_running_loop().run_in_executor(
            reranker.executor, score_records, records
        )
    except Exception:
        logger.exception("re-ranking failed; answering in retrieval order")
        return list(results), False
    finally:
        reranker.release()
        observe_seconds(time.perf_counter() - started)
    reordered = rerank_order(shortlist, teacher_scores)
    reordered.extend(results[len(shortlist) :])
    return reordered, True


class Reranker:
    """Scores shortlists with the teacher; call from a worker thread (forward passes block)."""

    def __init__(
        self,
        teacher: EarlyInteraction,
        fingerprint: str,
        *,
        cache_size: int,
        max_image_pixels: int,
        pairs_per_pass: int = PAIRS_PER_PASS,
    ) -> None:
        self.teacher = teacher
        self.fingerprint = fingerprint
        self.pixels = PixelCache(cache_size)
        self.max_image_pixels = max_image_pixels
        self.pairs_per_pass = pairs_per_pass
        self._forward_lock = threading.Lock()  # one teacher pass at a time
        # The teacher's own thread: its passes take long and must not starve the shared pool.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vld-teacher")
        self.max_waiting = MAX_WAITING
        self._admitted = 0  # touched on the event loop only

    def admit(self) -> bool:
        """Take a place in the re-rank queue (event loop only); False when it is full."""
        if self._admitted >= self.max_waiting:
            return False
        self._admitted += 1
        return True

    def release(self) -> None:
        self._admitted -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def gallery_pixels(self, path: str) -> np.ndarray | None:
        """A gallery image's preprocessed pixels, or None (logged) if it cannot be read.

        Cached under (path, size, mtime): a file rewritten in place (a re-crawled gallery,
        a new index version) is read again, never scored from stale pixels."""
        try:
            stat = os.stat(path)
        except OSError as exc:
            logger.warning("re-rank: cannot read gallery image %s: %s", path, exc)
            return None
        key = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
        cached = self.pixels.get(key)
        if cached is not None:
            return cached
        try:
            image = open_image(Path(path), max_pixels=self.max_image_pixels)
            pixels = preprocess_image(self.teacher.image_processor, image)
        except (ImageError, OSError) as exc:
            logger.warning("re-rank: cannot read gallery image %s: %s", path, exc)
            return None
        self.pixels.put(key, pixels)
        return pixels

    def query_pixels(self, image: Image.Image) -> np.ndarray:
        """A decoded query image's preprocessed pixels. Raises ImageError."""
        return preprocess_image(self.teacher.image_processor, image)

    def score(self, texts: Sequence[str], pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Teacher logits of the aligned pairs ``(texts[i], pixels[i])``: float32 ``(N,)``."""
        import torch

        assert len(texts) == len(pixels)
        out = np.zeros(len(texts), dtype=np.float32)
        if not texts:
            return out
        device = self.teacher.device
        with self._forward_lock, torch.inference_mode():
            for start in range(0, len(texts), self.pairs_per_pass):
                stop = min(start + self.pairs_per_pass, len(texts))
                tokens = self.teacher.tokenize(texts[start:stop])
                pixel_values, pixel_mask = collate_pixels(list(pixels[start:stop]))  # (b, 3, H, W)
                logits = self.teacher.score_tensors(
                    tokens["input_ids"].to(device),
                    tokens["attention_mask"].to(device),
                    pixel_values.to(device),
                    pixel_mask.to(device),
                )  # (b,)
                out[start:stop] = logits.float().cpu().numpy()
        return out

    def score_images(self, text: str, paths: Sequence[str]) -> list[float | None]:
        """Text → images: logits of (text, gallery image) pairs; None for an unreadable file."""
        pixels = [self.gallery_pixels(path) for path in paths]
        readable = [(i, p) for i, p in enumerate(pixels) if p is not None]
        logits = self.score([text] * len(readable), [p for _, p in readable])
        out: list[float | None] = [None] * len(paths)
        for (i, _), logit in zip(readable, logits, strict=True):
            out[i] = float(logit)
        return out

    def score_captions(self, image: Image.Image, captions: Sequence[str]) -> list[float | None]:
        """Image → captions: logits of (caption, query image) pairs."""
        if not captions:
            return []
        query = self.query_pixels(image)  # (3, H, W), shared by every pair
        return [float(x) for x in self.score(list(captions), [query] * len(captions))]


def load_reranker(
    teacher_dir: Path, *, device: str, cache_size: int, max_image_pixels: int
) -> Reranker:
    """Load :class:`model.EarlyInteraction` from ``teacher_dir``. Raises on any failure."""
    from model import EarlyInteraction  # heavy: only when a teacher is configured

    if not teacher_dir.is_dir():
        raise FileNotFoundError(f"{teacher_dir}: no such directory")
    fingerprint = teacher_fingerprint(teacher_dir)
    teacher = EarlyInteraction.from_pretrained(teacher_dir, device=device)
    return Reranker(teacher, fingerprint, cache_size=cache_size, max_image_pixels=max_image_pixels)
