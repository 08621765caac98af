"""Encoding engines: the one stage of a build that differs between one machine and a cluster.

A build is plan → encode → finalize → publish (:mod:`indexer.build`). Planning cuts each
modality into fixed shards (:class:`indexer.shards.ShardStore`, whose ``pending()`` are the
shards still to encode); finalizing reads the finished shards back into indexes, metadata and
a manifest; publishing moves ``CURRENT``. Only "encode the pending shards" depends on where
the work runs, and that is an :class:`Engine`:

- ``local`` (:class:`LocalEngine`): decoding processes and the forward pass on this machine
  (:mod:`indexer.pipeline`);
- ``ray`` (:class:`indexer.ray_engine.RayEngine`): decoding in Ray Data map tasks and the
  forward pass in a pool of encoder actors, on one node or many. Imported only when chosen, so
  ``ray`` is an optional dependency (the ``ray`` extra).

Every engine writes the same shard files through the same ``ShardStore``, so both give the
same vectors, and a build started by one engine can be resumed by the other.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from indexer.errors import UsageError
from indexer.pipeline import (
    EncodeStats,
    PipelineEncoder,
    ShardCallback,
    encode_caption_shards,
    encode_image_shards,
)
from indexer.shards import ShardStore

if TYPE_CHECKING:
    from indexer.build import BuildConfig

ENGINES = ("local", "ray")
RAY_EXTRA_HINT = "pip install 'vldeformer[ray]'"

# Loads the build's encoder in another process (a Ray actor): the build's own loader,
# :func:`indexer.build.load_build_encoder`, or a test double.
EncoderLoader = Callable[["BuildConfig"], PipelineEncoder]


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the ``ray`` engine runs; saved in the manifest with the config."""

    address: str | None = None  # None: start a local cluster with this machine's CPUs
    workers: int = 1  # encoder actors (each loads the model once)
    gpus_per_worker: float | None = None  # None: 1 with CUDA here (not --device cpu or ONNX)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UsageError(f"--ray-workers must be >= 1, got {self.workers}")
        gpus = self.gpus_per_worker
        if gpus is not None and not (math.isfinite(gpus) and gpus >= 0):
            raise UsageError(f"--gpus-per-worker must be a finite number >= 0, got {gpus}")
        if self.address is not None and self.address != "auto":
            host, _, port = self.address.removeprefix("ray://").rpartition(":")
            if not host or not port.isdigit():
                raise UsageError(
                    f"--ray-address must be host:port, ray://host:port or auto, got {self.address!r}"
                )


@dataclass(frozen=True)
class ImageJob:
    """One gallery's pending shards: the positions of ``store`` index ``paths``."""

    paths: Sequence[str]
    store: ShardStore
    batch_size: int  # images per forward pass
    max_pixels: int  # larger images are skipped as decompression bombs
    progress_interval_s: float


@dataclass(frozen=True)
class CaptionJob:
    """One caption corpus's pending shards: the positions of ``store`` index ``texts``."""

    texts: Sequence[str]
    store: ShardStore
    batch_size: int
    progress_interval_s: float


class Engine(Protocol):
    """Encodes the pending shards of a job into its ``ShardStore``; everything else of a
    build (plan, finalize, publish) is the same for every engine."""

    name: str

    def encode_images(
        self, encoder: PipelineEncoder, job: ImageJob, after_shard: ShardCallback | None
    ) -> EncodeStats: ...

    def encode_captions(
        self, encoder: PipelineEncoder, job: CaptionJob, after_shard: ShardCallback | None
    ) -> EncodeStats: ...

    def start(self) -> None:
        """Acquire what the engine needs (a Ray cluster) before any work, so that a bad
        address or too small a cluster fails before the model loads."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the manifest records under ``build.engine``."""
        ...

    def close(self) -> None:
        """Release what the engine started (a local Ray cluster)."""
        ...


class LocalEngine:
    """Decoding worker processes and the forward pass in this process (:mod:`indexer.pipeline`)."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        # None: one decoding process per core but one (the forward pass takes that one)
        self.workers = workers if workers is not None else max(1, (os.cpu_count() or 2) - 1)

    def encode_images(
        self, encoder: PipelineEncoder, job: ImageJob, after_shard: ShardCallback | None
    ) -> EncodeStats:
        return encode_image_shards(
            encoder,
            job.paths,
            job.store,
            batch_size=job.batch_size,
            workers=self.workers,
            max_pixels=job.max_pixels,
            progress_interval_s=job.progress_interval_s,
            after_shard=after_shard,
        )

    def encode_captions(
        self, encoder: PipelineEncoder, job: CaptionJob, after_shard: ShardCallback | None
    ) -> EncodeStats:
        return encode_caption_shards(
            encoder,
            job.texts,
            job.store,
            batch_size=job.batch_size,
            progress_interval_s=job.progress_interval_s,
            after_shard=after_shard,
        )

    def start(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "workers": self.workers}

    def close(self) -> None:
        pass


def make_engine(config: BuildConfig) -> Engine:
    """The engine ``config.engine`` names; ``ray`` raises :class:`UsageError` when the ``ray``
    extra is not installed or the cluster cannot be reached."""
    if config.engine == "local":
        return LocalEngine(config.workers)
    if config.engine != "ray":
        raise UsageError(f"--engine must be one of {ENGINES}, got {config.engine!r}")
    try:
        from indexer.ray_engine import RayEngine
    except ImportError as exc:  # ray itself, or one of ray[data]'s own (pyarrow, pandas...)
        if (exc.name or "").split(".")[0] in ("indexer", "model"):
            raise
        raise UsageError(
            f"--engine ray needs Ray Data, which is not installed ({exc}); "
            f"install the ray extra: {RAY_EXTRA_HINT}"
        ) from exc
    return RayEngine(config)
