"""The ``ray`` engine: encode a build's pending shards on a Ray cluster with Ray Data.

    units (one forward batch of one shard) → map: decode + preprocess (CPU tasks)
          → map_batches: encoder actors (ActorPoolStrategy, each loads the model once)
          → the driver: each shard, once all its units are back, written through ShardStore

A unit covers the same positions as one batch of the local engine (``batch_size`` positions
of one shard, bad files included) and is padded the same way, so both engines give the same
vectors. Unusable files become the same :class:`SkippedItem` with the decoder's reason.

Where files live: every node reads the gallery files at the paths of the gallery (a shared
file system or the same mount on every node). The shards are written by the driver only:
what comes back per image is its vector (``D`` float32, 3 KB at D=768), so the build's
staging directory (``INDEX_ROOT/.tmp-<version>``) must be on the driver's disk, and the
finalize step reads it there. A killed driver ends its Ray job; ``--resume`` re-encodes only
the shards whose files are not complete.

An actor that dies (a node lost, a crashed process) is restarted and its unit retried: Ray
Data's defaults for actor pools (``max_restarts=-1``, ``max_task_retries=-1``; passing them is
deprecated since Ray 2.5x). A unit the driver already holds is never counted twice.

Resources: each encoder actor takes one CPU (and ``--gpus-per-worker`` GPUs); decoding tasks
take the other CPUs, so a cluster needs more CPUs than ``--ray-workers``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray
import torch

from indexer.build import BuildConfig, load_build_encoder
from indexer.engines import CaptionJob, EncoderLoader, ImageJob
from indexer.errors import UsageError
from indexer.pipeline import (
    EncodeStats,
    ImageDecodeDataset,
    PipelineEncoder,
    ShardBuffer,
    ShardCallback,
    collate_decoded,
    skipped_image,
)
from indexer.progress import Progress
from indexer.shards import Shard, ShardStore
from indexer.sources import SkippedItem
from model.modeling import autocast

logger = logging.getLogger(__name__)

ACTOR_RETRIES = 3  # restarts of a dead encoder actor, and retries of its batch
_Stage = Callable[[ray.data.Dataset], ray.data.Dataset]  # adds the decode stage to a dataset


@dataclass(frozen=True)
class _Unit:
    """The result of one unit on the driver: its valid positions and their vectors."""

    shard: int
    start: int
    size: int
    positions: np.ndarray  # (n,) int64
    vectors: np.ndarray  # (n, D) float32
    skipped: list[SkippedItem]
    decode_seconds: float
    encode_seconds: float


def _decode_unit(row: dict[str, Any], processor: Any, max_pixels: int) -> dict[str, Any]:
    """Decode and pad one unit's files (a Ray Data map task, on any node's CPU)."""
    torch.set_num_threads(1)  # one image per call: more threads only oversubscribe the cores
    paths, ids, start = list(row["paths"]), list(row["ids"]), int(row["start"])
    dataset = ImageDecodeDataset(paths, processor, max_pixels)
    batch = collate_decoded([dataset[i] for i in range(len(paths))])
    skipped = [skipped_image(f, ids[f.position], paths[f.position]) for f in batch.failures]
    return {
        "shard": row["shard"],
        "start": start,
        "size": len(paths),
        "positions": np.asarray([start + p for p in batch.positions], dtype=np.int64),
        "pixel_values": batch.pixel_values.numpy()  # (B, 3, H, W)
        if batch.pixel_values is not None
        else np.zeros((0, 3, 1, 1), dtype=np.float32),
        "pixel_mask": batch.pixel_mask.numpy()  # (B, H, W)
        if batch.pixel_mask is not None
        else np.zeros((0, 1, 1), dtype=np.int64),
        "skipped": json.dumps([item.to_dict() for item in skipped]),
        "decode_seconds": batch.decode_seconds,
    }


def _caption_unit(row: dict[str, Any]) -> dict[str, Any]:
    """A unit of captions needs no decoding: its positions are all of its range."""
    start, size = int(row["start"]), len(row["texts"])
    return {
        **row,
        "size": size,
        "positions": np.arange(start, start + size, dtype=np.int64),
        "skipped": "[]",
        "decode_seconds": 0.0,
    }


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`UsageError` unless ``[ray://]host:port`` (its form checked by
    :class:`RayOptions`) accepts a TCP connection."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise UsageError(
            f"--ray-address {address}: no Ray cluster answers there ({exc}); start one with "
            "`ray start --head` or leave --ray-address out to start a local one"
        ) from exc


class _EncoderActor:
    """One encoder actor: loads the build's encoder once, then encodes unit after unit."""

    def __init__(self, load_encoder: EncoderLoader, config: BuildConfig, threads: int) -> None:
        if config.device == "cpu" or not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.encoder = load_encoder(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        # batch_size=1: each column holds one unit; variable shapes come as object arrays
        started = time.perf_counter()
        if "texts" in batch:
            texts = [str(text) for text in batch["texts"][0]]
            vectors = self.encoder.encode_text(texts, batch_size=max(1, len(texts)))
        elif len(batch["positions"][0]) == 0:  # every file of the unit was unusable
            vectors = np.zeros((0, self.encoder.embedding_dim), dtype=np.float32)
        else:
            device = self.encoder.device
            pixel_values = torch.from_numpy(np.array(batch["pixel_values"][0]))  # writable copy
            pixel_mask = torch.from_numpy(np.array(batch["pixel_mask"][0]))
            with torch.inference_mode(), autocast(device):
                encoded = self.encoder.encode_pixels(
                    pixel_values.to(device, dtype=self.encoder.dtype),
                    pixel_mask.to(device),
                )  # (B, D)
            vectors = encoded.float().cpu().numpy()
        return {
            "shard": batch["shard"],
            "start": batch["start"],
            "size": batch["size"],
            "positions": [np.asarray(batch["positions"][0], dtype=np.int64)],
            "vectors": [np.asarray(vectors, dtype=np.float32)],
            "skipped": batch["skipped"],
            "decode_seconds": batch["decode_seconds"],
            "encode_seconds": [time.perf_counter() - started],
        }


class RayEngine:
    """Encodes on a Ray cluster: connects (or starts a local one) on first use.

    ``load_encoder`` loads the encoder in each actor (default: the build's own loader); tests
    pass a wrapper that injects faults.
    """

    name = "ray"

    def __init__(self, config: BuildConfig, load_encoder: EncoderLoader = load_build_encoder):
        self.config = config
        self.options = options = config.ray
        self.load_encoder = load_encoder
        self.started_cluster = False
        self.cluster_start_seconds = 0.0
        if options.gpus_per_worker is not None:
            self.gpus_per_worker = options.gpus_per_worker
        else:  # a GPU each when this machine has one and the build may use it
            on_cpu = config.device == "cpu" or config.runtime in ("onnx", "onnx-int8")
            self.gpus_per_worker = 0.0 if on_cpu or not torch.cuda.is_available() else 1.0
        if self.gpus_per_worker > 0 and config.runtime in ("onnx", "onnx-int8"):
            raise UsageError(
                f"--runtime {config.runtime} runs on the CPU: with --gpus-per-worker "
                f"{self.gpus_per_worker:g} the actors would hold GPUs they never use; "
                "use --runtime torch on GPUs"
            )

    def start(self) -> None:
        self.connect()

    def connect(self) -> None:
        """Join ``options.address``, or start a local cluster with this machine's CPUs; a Ray
        session already open in this process (``ray.init`` by the caller) is used as it is."""
        if ray.is_initialized():
            return
        started = time.perf_counter()
        address = self.options.address
        if address is not None and address != "auto":
            _check_reachable(address)  # ray.init retries an unreachable address for minutes
        try:
            if address is None:
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False)
                self.started_cluster = True
            else:
                ray.init(address=address)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
            if address is None and os.environ.get("RAY_ADDRESS"):
                raise UsageError(
                    f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is set in the environment, so Ray "
                    "joins that cluster instead of starting one: pass it as --ray-address, or "
                    f"unset it ({type(exc).__name__}: {exc})"
                ) from exc
            where = f"--ray-address {address}" if address else "a local Ray cluster"
            raise UsageError(f"cannot connect to {where}: {type(exc).__name__}: {exc}") from exc
        ray.data.DataContext.get_current().enable_progress_bars = False
        self.cluster_start_seconds = time.perf_counter() - started
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < self.options.workers + 1:  # else the actors hold every CPU: no decoding
            message = (
                f"--ray-workers {self.options.workers}: each encoder actor takes a CPU and "
                f"decoding needs at least one more, but the cluster has {cpus:g} CPUs"
            )
            if address is None:
                self.close()
                raise UsageError(message)
            logger.warning("%s (now; an autoscaling cluster may add more)", message)
        gpus = ray.cluster_resources().get("GPU", 0)
        wanted = self.options.workers * self.gpus_per_worker
        if gpus < wanted:  # else Ray waits for GPUs forever
            message = (
                f"--ray-workers {self.options.workers} x --gpus-per-worker "
                f"{self.gpus_per_worker:g} need {wanted:g} GPUs, the cluster has {gpus:g}"
            )
            if address is None:
                self.close()
                raise UsageError(message)
            logger.warning("%s (now; an autoscaling cluster may add more)", message)
        logger.info(
            "Ray cluster %s: %s (%.1f s to connect)",
            address or "local",
            ray.cluster_resources(),
            self.cluster_start_seconds,
        )

    def encode_images(
        self, encoder: PipelineEncoder, job: ImageJob, after_shard: ShardCallback | None
    ) -> EncodeStats:
        units = [
            {
                "shard": shard.index,
                "start": batch.start,
                "paths": list(job.paths[batch.start : batch.stop]),
                "ids": list(job.store.ids[batch.start : batch.stop]),
            }
            for shard, batch in job.store.pending_batches(job.batch_size)
        ]
        return self._run(
            encoder,
            job.store,
            units,
            "images",
            len(job.paths),
            job.progress_interval_s,
            after_shard,
            decode=lambda dataset: dataset.map(
                functools.partial(
                    _decode_unit, processor=encoder.image_processor, max_pixels=job.max_pixels
                )
            ),
        )

    def encode_captions(
        self, encoder: PipelineEncoder, job: CaptionJob, after_shard: ShardCallback | None
    ) -> EncodeStats:
        units = [
            {
                "shard": shard.index,
                "start": batch.start,
                "texts": list(job.texts[batch.start : batch.stop]),
            }
            for shard, batch in job.store.pending_batches(job.batch_size)
        ]
        return self._run(
            encoder,
            job.store,
            units,
            "captions",
            len(job.texts),
            job.progress_interval_s,
            after_shard,
            decode=lambda dataset: dataset.map(_caption_unit),
        )

    def _run(
        self,
        encoder: PipelineEncoder,
        store: ShardStore,
        units: list[dict[str, Any]],
        modality: str,
        total: int,
        progress_interval_s: float,
        after_shard: ShardCallback | None,
        decode: _Stage,
    ) -> EncodeStats:
        started = time.perf_counter()
        stats = EncodeStats()
        pending = {shard.index: shard for shard in store.pending()}
        stats.resumed = total - sum(s.stop - s.start for s in pending.values())
        if not pending:
            return stats
        self.connect()
        progress = Progress(total, modality, initial=stats.resumed, interval_s=progress_interval_s)
        results: dict[int, dict[int, _Unit]] = {index: {} for index in pending}
        try:
            waited = time.perf_counter()
            for unit in self._results(encoder, units, decode):
                stats.wait_seconds += time.perf_counter() - waited
                if not stats.first_batch_seconds:
                    stats.first_batch_seconds = time.perf_counter() - started
                received = results.get(unit.shard)
                if received is None or unit.start in received:  # written, or a retry's twin
                    logger.warning("ignored a second result for %s %d", modality, unit.start)
                    continue
                received[unit.start] = unit
                stats.decode_seconds += unit.decode_seconds
                stats.encode_seconds += unit.encode_seconds
                for item in unit.skipped:
                    logger.warning("skipped %s: %s (%s)", item.path, item.reason, item.detail)
                progress.update(unit.size)
                shard = pending[unit.shard]
                if sum(u.size for u in received.values()) == shard.stop - shard.start:
                    written, skipped = self._write(store, shard, results.pop(unit.shard))
                    stats.encoded += written
                    stats.skipped += skipped
                    if after_shard is not None:
                        after_shard(shard)
                waited = time.perf_counter()
        finally:
            progress.close()
        if results:
            raise RuntimeError(f"the Ray job returned no result for {modality} shards {results}")
        stats.seconds = time.perf_counter() - started
        return stats

    def _results(
        self, encoder: PipelineEncoder, units: list[dict[str, Any]], decode: _Stage
    ) -> Iterator[_Unit]:
        """Run the dataset and yield each unit's result as it reaches the driver."""
        # The actors load the encoder the driver resolved: same runtime, device and dtype.
        gpus = self.gpus_per_worker
        if gpus > 0 and encoder.runtime != "torch":
            raise UsageError(
                f"the {encoder.runtime} runtime (chosen here, on the driver's CPU) runs on the "
                f"CPU, but the actors would hold {gpus:g} GPU(s) each: pass --runtime torch"
            )
        # A CPU driver with GPU actors: let each actor resolve its own dtype (auto: bfloat16
        # on its GPU) instead of the driver's float32.
        dtype = str(encoder.dtype).removeprefix("torch.")
        if gpus > 0 and encoder.device.type == "cpu":
            dtype = self.config.dtype
        actor_config = replace(
            self.config,
            runtime=encoder.runtime,
            dtype=dtype,
            device=self.config.device if gpus > 0 else "cpu",
        )
        dataset = decode(ray.data.from_items(units, override_num_blocks=len(units)))
        encoded = dataset.map_batches(
            _EncoderActor,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.options.workers),
            fn_constructor_kwargs={
                "load_encoder": self.load_encoder,
                "config": actor_config,
                "threads": actor_config.threads or 1,
            },
            num_gpus=gpus,
            num_cpus=1,
            # Bounded: an actor that dies on every try (a poison batch, the OOM killer) fails
            # the build (resumable) instead of looping; Ray Data's default retries forever.
            max_restarts=ACTOR_RETRIES,
            max_task_retries=ACTOR_RETRIES,
            # Ray Data fuses a task map into the next actor map when their resources match
            # (CPU actors): decoding would then run inside the actors, one image at a time
            # per actor, leaving the other CPUs idle. A (neutral) label selector of the
            # actors keeps decoding in its own tasks on every free CPU.
            label_selector={},
        )
        for row in encoded.iter_rows():
            yield _Unit(
                shard=int(row["shard"]),
                start=int(row["start"]),
                size=int(row["size"]),
                positions=np.asarray(row["positions"], dtype=np.int64),
                vectors=np.asarray(row["vectors"], dtype=np.float32).reshape(
                    len(row["positions"]), encoder.embedding_dim
                ),
                skipped=[SkippedItem(**item) for item in json.loads(row["skipped"])],
                decode_seconds=float(row["decode_seconds"]),
                encode_seconds=float(row["encode_seconds"]),
            )

    @staticmethod
    def _write(store: ShardStore, shard: Shard, units: dict[int, _Unit]) -> tuple[int, int]:
        """Write a shard from its units in position order (as the local engine does)."""
        buffer = ShardBuffer(shard)
        for start in sorted(units):
            unit = units[start]
            buffer.add([int(p) for p in unit.positions], unit.vectors)
            buffer.skipped += unit.skipped
        return buffer.write(store), len(buffer.skipped)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.options.address or "local",
            "workers": self.options.workers,
            "gpus_per_worker": self.gpus_per_worker,
            "cluster_start_seconds": round(self.cluster_start_seconds, 3),
        }

    def close(self) -> None:
        if self.started_cluster:
            ray.shutdown()
            self.started_cluster = False
