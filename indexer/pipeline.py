"""The encoding stages: decode images in worker processes, encode in the main process, shard.

Images: a ``DataLoader`` over :class:`ImageDecodeDataset` decodes (``model.images.open_image``)
and preprocesses each file in ``workers`` processes, collates batches there, and hands them
to the main process, which runs the forward pass meanwhile (decoding of the next batches
overlaps the current forward pass; ``workers=0`` decodes in-process). A file that cannot be
used becomes a skipped item with the decoder's reason, never an exception. The forward pass
is the encoder runtime's (:mod:`model.runtime`: torch or ONNX Runtime), on the same pixels.

Captions: the runtime's ``encode_text`` batch by batch. Both write :mod:`indexer.shards`, so
an interrupted build resumes from the last finished shard.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from indexer.progress import Progress
from indexer.shards import Shard, ShardStore
from indexer.sources import SkippedItem
from model.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    collate_pixels,
    open_image,
    preprocess_image,
)
from model.modeling import autocast
from model.runtime import OnnxEncoder, TorchEncoder

logger = logging.getLogger(__name__)

ShardCallback = Callable[[Shard], None]  # called after each shard is written
# The encoders of model.runtime: both take preprocessed pixels (``encode_pixels``).
PipelineEncoder: TypeAlias = TorchEncoder | OnnxEncoder


@dataclass(frozen=True)
class DecodedImage:
    """One decoded gallery file: ``pixels`` float32 ``(3, H, W)``, or a ``reason`` it is unusable."""

    position: int
    pixels: np.ndarray | None
    reason: str | None = None
    detail: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class DecodedBatch:
    """A collated batch: ``pixel_values (B, 3, H, W)`` float32, ``pixel_mask (B, H, W)`` int64
    for the usable files at ``positions``; the unusable ones in ``failures``."""

    positions: list[int]
    pixel_values: torch.Tensor | None
    pixel_mask: torch.Tensor | None
    failures: list[DecodedImage]
    decode_seconds: float


@dataclass
class EncodeStats:
    """What one modality's encoding did in this run (seconds are wall-clock)."""

    encoded: int = 0
    skipped: int = 0
    resumed: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0  # main process waiting for decoded batches
    encode_seconds: float = 0.0  # forward passes, including the copy back to the host
    decode_seconds: float = 0.0  # decode + preprocess time summed over worker processes
    first_batch_seconds: float = 0.0  # from the start until the first batch was encoded

    def to_dict(self) -> dict[str, float]:
        rate = self.encoded / self.seconds if self.seconds > 0 else 0.0
        return {
            "encoded": self.encoded,
            "skipped": self.skipped,
            "resumed": self.resumed,
            "seconds": round(self.seconds, 3),
            "items_per_s": round(rate, 2),
            "wait_seconds": round(self.wait_seconds, 3),
            "encode_seconds": round(self.encode_seconds, 3),
            "decode_seconds": round(self.decode_seconds, 3),
            "first_batch_seconds": round(self.first_batch_seconds, 3),
        }


class ImageDecodeDataset(Dataset[DecodedImage]):
    """Decodes and preprocesses the image at a position; picklable for any start method."""

    def __init__(
        self, paths: Sequence[str], processor: Any, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.paths = list(paths)
        self.processor = processor
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> DecodedImage:
        started = time.perf_counter()
        try:
            image = open_image(self.paths[position], max_pixels=self.max_pixels)
            pixels = preprocess_image(self.processor, image)
        except ImageError as exc:
            return DecodedImage(position, None, exc.reason, str(exc), time.perf_counter() - started)
        except OSError as exc:
            reason = "missing_file" if isinstance(exc, FileNotFoundError) else "unreadable"
            return DecodedImage(position, None, reason, str(exc), time.perf_counter() - started)
        except Exception as exc:  # one bad file must never abort a build: record it instead
            detail = f"{type(exc).__name__}: {exc}"
            return DecodedImage(
                position, None, "decode_failed", detail, time.perf_counter() - started
            )
        return DecodedImage(position, pixels, seconds=time.perf_counter() - started)


def collate_decoded(items: list[DecodedImage]) -> DecodedBatch:
    """Pad the usable images of a batch together (runs in the worker process)."""
    usable = [item for item in items if item.pixels is not None]
    failures = [item for item in items if item.pixels is None]
    pixel_values = pixel_mask = None
    if usable:
        pixel_values, pixel_mask = collate_pixels(
            [item.pixels for item in usable if item.pixels is not None]
        )
    seconds = sum(item.seconds for item in items)
    return DecodedBatch(
        [item.position for item in usable], pixel_values, pixel_mask, failures, seconds
    )


def skipped_image(failure: DecodedImage, image_id: str, path: str) -> SkippedItem:
    """The skipped item that records an unusable gallery file, with the decoder's reason."""
    return SkippedItem("images", image_id, path, failure.reason or "decode_failed", failure.detail)


def _init_worker(worker_id: int) -> None:
    # Decoding is one image per call: intra-op threads in workers only oversubscribe cores.
    torch.set_num_threads(1)


def encode_image_shards(
    encoder: PipelineEncoder,
    paths: Sequence[str],
    store: ShardStore,
    *,
    batch_size: int,
    workers: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress_interval_s: float = 10.0,
    after_shard: ShardCallback | None = None,
) -> EncodeStats:
    """Encode every pending shard of ``store`` (positions index ``paths``) with ``encoder``:
    its ``image_processor`` in the decoding workers, its ``encode_pixels`` in this process."""
    started = time.perf_counter()
    stats = EncodeStats()
    pending = store.pending()
    stats.resumed = len(paths) - sum(s.stop - s.start for s in pending)
    if not pending:
        return stats
    batches = [list(positions) for _, positions in store.pending_batches(batch_size)]
    device = encoder.device
    loader = DataLoader(
        ImageDecodeDataset(paths, encoder.image_processor, max_pixels),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_decoded,
        pin_memory=device.type == "cuda",
        worker_init_fn=_init_worker if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    dtype = encoder.dtype
    threads = torch.get_num_threads()
    if device.type == "cpu" and workers > 0:
        # The decoding processes take cores; more intra-op threads would only fight them.
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - workers)))
    progress = Progress(len(paths), "images", initial=stats.resumed, interval_s=progress_interval_s)
    shard_iter = iter(pending)
    shard = next(shard_iter)
    collected: ShardBuffer = ShardBuffer(shard)
    try:
        waited = time.perf_counter()
        for batch in loader:
            stats.wait_seconds += time.perf_counter() - waited
            stats.decode_seconds += batch.decode_seconds
            for failure in batch.failures:
                item = skipped_image(failure, store.ids[failure.position], paths[failure.position])
                logger.warning("skipped %s: %s (%s)", item.path, item.reason, item.detail)
                collected.skipped.append(item)
            if batch.pixel_values is not None and batch.pixel_mask is not None:
                forward_started = time.perf_counter()
                with torch.inference_mode(), autocast(device):
                    vectors = encoder.encode_pixels(
                        batch.pixel_values.to(device, dtype=dtype, non_blocking=True),
                        batch.pixel_mask.to(device, non_blocking=True),
                    )  # (B, D)
                collected.add(batch.positions, vectors.float().cpu().numpy())
                stats.encode_seconds += time.perf_counter() - forward_started
                if not stats.first_batch_seconds:
                    stats.first_batch_seconds = time.perf_counter() - started
            collected.seen += len(batch.positions) + len(batch.failures)
            progress.update(len(batch.positions) + len(batch.failures))
            if collected.complete:
                stats.encoded += collected.write(store)
                stats.skipped += len(collected.skipped)
                if after_shard is not None:
                    after_shard(collected.shard)
                next_shard = next(shard_iter, None)
                if next_shard is not None:
                    collected = ShardBuffer(next_shard)
            waited = time.perf_counter()
    finally:
        progress.close()
        torch.set_num_threads(threads)
    stats.seconds = time.perf_counter() - started
    return stats


def encode_caption_shards(
    encoder: PipelineEncoder,
    texts: Sequence[str],
    store: ShardStore,
    *,
    batch_size: int,
    progress_interval_s: float = 10.0,
    after_shard: ShardCallback | None = None,
) -> EncodeStats:
    """Encode every pending shard of ``store`` (positions index ``texts``) with ``encoder.encode_text``."""
    started = time.perf_counter()
    stats = EncodeStats()
    pending = store.pending()
    stats.resumed = len(texts) - sum(s.stop - s.start for s in pending)
    progress = Progress(
        len(texts), "captions", initial=stats.resumed, interval_s=progress_interval_s
    )
    try:
        for shard in pending:
            collected = ShardBuffer(shard)
            for start in range(shard.start, shard.stop, batch_size):
                stop = min(start + batch_size, shard.stop)
                forward_started = time.perf_counter()
                vectors = encoder.encode_text(list(texts[start:stop]), batch_size=batch_size)
                stats.encode_seconds += time.perf_counter() - forward_started
                if not stats.first_batch_seconds:
                    stats.first_batch_seconds = time.perf_counter() - started
                collected.add(list(range(start, stop)), vectors)
                collected.seen += stop - start
                progress.update(stop - start)
            stats.encoded += collected.write(store)
            if after_shard is not None:
                after_shard(shard)
    finally:
        progress.close()
    stats.seconds = time.perf_counter() - started
    return stats


class ShardBuffer:
    """Vectors and skipped items of the shard being encoded, until it is complete (batches
    are added in position order)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.positions: list[int] = []
        self.vectors: list[np.ndarray] = []
        self.skipped: list[SkippedItem] = []
        self.seen = 0

    @property
    def complete(self) -> bool:
        return self.seen >= self.shard.stop - self.shard.start

    def add(self, positions: list[int], vectors: np.ndarray) -> None:
        self.positions += positions
        self.vectors.append(np.asarray(vectors, dtype=np.float32))

    def write(self, store: ShardStore) -> int:
        vectors = (
            np.concatenate(self.vectors)
            if self.vectors
            else np.zeros((0, store.dim), dtype=np.float32)
        )
        store.write(self.shard, self.positions, vectors, self.skipped)
        return len(self.positions)
