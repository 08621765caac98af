"""The build runner: plan → encode the pending shards → finalize → publish a version.

- plan: read the inputs and cut each modality into fixed shards (:class:`BuildPlan`; a
  resumed build has fewer pending ones);
- encode: the engine's one job (:mod:`indexer.engines`: ``local`` on this machine, ``ray`` on
  a Ray cluster), writing every shard through :class:`indexer.shards.ShardStore`;
- finalize: the finished shards become faiss indexes, metadata and a manifest in a staging
  directory; publish: :func:`indexer.publish.publish_version` moves ``CURRENT``.

Plan, finalize and publish are the same for every engine.

Everything that can be wrong with the arguments (paths, duplicate ids, the model directory,
the output root, a concurrent build) is found before the first image is decoded and raised
as :class:`UsageError`. Failures after that raise :class:`BuildError`; the partial build
stays in ``INDEX_ROOT/.tmp-<version>`` for ``--resume``. ``CURRENT`` moves only after a
complete version is on disk (:mod:`indexer.publish`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer.engines import ENGINES, CaptionJob, Engine, ImageJob, RayOptions, make_engine
from indexer.errors import BuildError, UsageError
from indexer.faiss_index import INDEX_OPTIONS, IndexPolicy
from indexer.manifest import (
    BuildInfo,
    Counts,
    EngineInfo,
    IndexEntry,
    Inputs,
    Manifest,
    RuntimeCheckFigures,
    SourceInfo,
)
from indexer.pipeline import EncodeStats, PipelineEncoder, ShardCallback
from indexer.publish import (
    TEMP_PREFIX,
    BuildLock,
    CaptionRow,
    ImageRow,
    base_manifest,
    new_version_name,
    publish_version,
    remove_stale_builds,
    stage_version,
    write_manifest,
)
from indexer.shards import ShardStore
from indexer.sources import (
    CaptionCorpus,
    Gallery,
    SkippedItem,
    link_captions,
    read_captions,
    read_gallery,
)
from indexer.store import DEFAULT_RUNTIME, FORMAT_VERSION
from model.images import DEFAULT_MAX_PIXELS
from model.runtime import RUNTIMES

logger = logging.getLogger(__name__)

BUILD_RECORD = "build.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RUNTIME_OPTIONS = ("auto", *RUNTIMES)


@dataclass(frozen=True)
class BuildConfig:
    """One build's settings; saved in the manifest."""

    model_dir: Path
    out_root: Path
    images: Path | None = None
    captions: Path | None = None
    caption_split: str | None = None  # Karpathy split to keep (--split)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto = bfloat16 on a GPU, float32 on the CPU (torch runtime only)
    # Encoder runtime (model.runtime). auto = torch on a GPU; on the CPU the first of
    # onnx-int8, onnx, torch that passes its check (exports and checks on first use).
    runtime: str = DEFAULT_RUNTIME
    batch_size: int | None = None  # images per forward pass; None = 256 on a GPU, 32 on the CPU
    workers: int | None = None  # local engine: decoding processes; None = one per core but one
    threads: int | None = None  # torch intra-op threads for encoding; None = torch's default
    index: str = "auto"
    resume: bool = False
    shard_size: int = 4096  # items per embedding shard: the unit of --resume
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped as decompression bombs
    policy: IndexPolicy = field(default_factory=IndexPolicy)
    progress_interval_s: float = 10.0
    engine: str = "local"  # local | ray (indexer.engines)
    ray: RayOptions = field(default_factory=RayOptions)  # used by the ray engine only

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {ENGINES}, got {self.engine!r}")
        if self.images is None and self.captions is None:
            raise UsageError("give at least one of --images and --captions")
        if self.index not in INDEX_OPTIONS:
            raise UsageError(f"--index must be one of {INDEX_OPTIONS}, got {self.index!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.runtime not in RUNTIME_OPTIONS:
            raise UsageError(f"--runtime must be one of {RUNTIME_OPTIONS}, got {self.runtime!r}")
        if self.runtime not in ("torch", "auto") and self.dtype not in ("auto", "float32"):
            raise UsageError(
                f"--dtype {self.dtype} applies to --runtime torch only; "
                f"--runtime {self.runtime} computes in float32"
            )
        for name in ("batch_size", "shard_size", "max_pixels", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers must be >= 0, got {self.workers}")

    def to_dict(self) -> dict[str, Any]:
        return dict(json.loads(json.dumps(dataclasses.asdict(self), default=str)))


@dataclass(frozen=True)
class BuildResult:
    """A published version and what went into it."""

    version: str
    directory: Path
    manifest: Manifest

    def summary(self) -> str:
        """The one-line summary the CLI prints."""
        counts, build = self.manifest.counts, self.manifest.build
        assert build is not None, "a build's manifest has a build section"
        reasons = ", ".join(
            f"{r}: {n}" for r, n in sorted((self.manifest.skipped_by_reason or {}).items())
        )
        return (
            f"published {self.version}: {counts.images} images, {counts.captions} captions, "
            f"{counts.skipped} skipped{f' ({reasons})' if reasons else ''} in "
            f"{build.seconds or 0.0:.1f} s ({build.images_per_s or 0.0:.1f} images/s, "
            f"{build.captions_per_s or 0.0:.1f} captions/s) -> {self.directory}"
        )


@dataclass(frozen=True)
class BuildPlan:
    """What a build encodes: each modality's shards (a ``ShardStore`` whose ``pending()`` are
    still to encode) with its inputs in position order."""

    images: ImageJob | None
    captions: CaptionJob | None


@dataclass
class _Modality:
    """The encoded vectors of one modality and the input positions they came from."""

    vectors: list[np.ndarray]  # (n_i, D) float32 blocks in row order, memory-mapped shards
    positions: np.ndarray
    skipped: list[SkippedItem]
    stats: EncodeStats


def run_build(
    config: BuildConfig,
    *,
    after_shard: ShardCallback | None = None,
    engine: Engine | None = None,
) -> BuildResult:
    """Build and publish a version; see the module docstring for the failure contract.

    ``engine`` defaults to the one ``config.engine`` names (made, and closed, here); one
    given is the caller's to close. ``after_shard`` is called after each shard is written.
    """
    started = time.perf_counter()
    gallery = read_gallery(config.images) if config.images is not None else None
    corpus = read_captions(config.captions, split=config.caption_split) if config.captions else None
    if gallery is not None and not gallery.images:
        raise BuildError(
            f"no image file in {gallery.source} ({gallery.ignored_files} other files ignored); "
            "CURRENT is unchanged"
        )
    if corpus is not None and not corpus.captions:
        raise BuildError(f"no caption in {corpus.source}; CURRENT is unchanged")
    root = Path(config.out_root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--out {root} is a file, not a directory")
    threads = torch.get_num_threads()
    with BuildLock(root):
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        try:
            return _build_locked(config, root, gallery, corpus, started, after_shard, engine)
        finally:
            torch.set_num_threads(threads)


def _build_locked(
    config: BuildConfig,
    root: Path,
    gallery: Gallery | None,
    corpus: CaptionCorpus | None,
    started: float,
    after_shard: ShardCallback | None,
    given_engine: Engine | None,
) -> BuildResult:
    """Everything after the lock: load, plan, encode, finalize, publish."""
    engine = given_engine if given_engine is not None else make_engine(config)
    try:
        engine.start()  # a bad cluster address fails here, before the model loads
        encoder = load_build_encoder(config)
        digest = _inputs_digest(config, gallery, corpus, encoder)
        build_dir, version = _prepare_build_dir(root, digest, config)
        logger.info("building version %s in %s with the %s engine", version, build_dir, engine.name)
        plan = _plan(encoder, gallery, corpus, build_dir, config)
        images = captions = None
        if plan.images is not None and gallery is not None:
            stats = engine.encode_images(encoder, plan.images, after_shard)
            images = _finalize_images(plan.images, gallery, stats)
        if plan.captions is not None and corpus is not None:
            stats = engine.encode_captions(encoder, plan.captions, after_shard)
            positions, _ = plan.captions.store.layout()
            blocks = plan.captions.store.vector_blocks()
            captions = _Modality(blocks, positions, list(corpus.skipped), stats)
        engine_record = engine.describe()
    finally:
        if given_engine is None:
            engine.close()
    device = str(encoder.device.type)
    staged = build_dir / "version"
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir()
    contents = _write_version(staged, config, gallery, corpus, images, captions, device)
    manifest = _version_manifest(
        version,
        config,
        encoder,
        gallery,
        corpus,
        images,
        captions,
        contents,
        BuildInfo(
            config=config.to_dict(),
            device=device,
            runtime=encoder.runtime,
            dtype=str(encoder.dtype).removeprefix("torch."),
            images=images.stats.to_dict() if images else None,
            captions=captions.stats.to_dict() if captions else None,
            engine=EngineInfo.from_dict(engine_record),
            seconds=round(time.perf_counter() - started, 3),
            resumed_items=sum(m.stats.resumed for m in (images, captions) if m is not None),
            images_per_s=_rate(images),
            captions_per_s=_rate(captions),
        ),
    )
    manifest = write_manifest(staged, manifest)
    directory = publish_version(root, staged, version)
    shutil.rmtree(build_dir, ignore_errors=True)
    return BuildResult(version, directory, manifest)


def load_build_encoder(config: BuildConfig) -> PipelineEncoder:
    """The encoder of ``config.model_dir`` with its ``runtime``, ``device`` and ``dtype``: in
    the build's process, and in each of the ``ray`` engine's encoder actors. Every way it
    cannot load is a :class:`UsageError`."""
    from model import CheckpointError, VLDeformer
    from model.backbone import resolve_device
    from model.runtime import RuntimeUnavailable, TorchEncoder, load_encoder

    if not Path(config.model_dir).is_dir():
        raise UsageError(f"--model {config.model_dir}: no such directory")
    # The ONNX runtimes run on the CPU: there --device auto means the CPU, not a GPU.
    device_name = (
        "cpu" if config.runtime.startswith("onnx") and config.device == "auto" else config.device
    )
    try:
        device = resolve_device(device_name)
    except (CheckpointError, RuntimeError) as exc:  # CUDA missing, or not a device name
        raise UsageError(f"--device {config.device}: {exc}") from exc
    runtime = _resolve_runtime(config, device)
    if runtime != "torch" and device.type != "cpu":
        raise UsageError(
            f"--runtime {runtime} runs on the CPU only, got --device {config.device}; "
            "use --device cpu, or --runtime torch on a GPU"
        )
    encoder: PipelineEncoder
    try:
        if runtime == "torch":
            dtype = DTYPES.get(
                config.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
            )
            network = VLDeformer.from_pretrained(config.model_dir, device=device, dtype=dtype)
            encoder = TorchEncoder(network)
        else:
            encoder = load_encoder(config.model_dir, runtime, threads=config.threads)
    except RuntimeUnavailable as exc:
        raise UsageError(f"--runtime {runtime}: {exc}") from exc
    except (CheckpointError, OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"--model {config.model_dir} does not load: {exc}") from exc
    logger.info(
        "loaded model %s with the %s runtime on %s (%s, dim %d, fingerprint %s…)",
        config.model_dir,
        encoder.runtime,
        encoder.device,
        encoder.dtype,
        encoder.embedding_dim,
        encoder.fingerprint[:12],
    )
    return encoder


def _resolve_runtime(config: BuildConfig, device: torch.device) -> str:
    """``config.runtime``, with ``auto`` made concrete: torch on a GPU, else the fastest that
    passes its check (:func:`model.runtime.pick_default_runtime`)."""
    if config.runtime != "auto":
        return config.runtime
    if device.type != "cpu":
        return "torch"
    from model.runtime import pick_default_runtime

    runtime = pick_default_runtime(config.model_dir)
    logger.info("--runtime auto: %s", runtime)
    return runtime


def _inputs_digest(
    config: BuildConfig,
    gallery: Gallery | None,
    corpus: CaptionCorpus | None,
    encoder: PipelineEncoder,
) -> str:
    """What a resumable build must share: inputs (with file sizes and mtimes), model, sharding.

    The model counts with its runtime, dtype and device type: shards of another runtime or
    precision must not be mixed into this build's vectors.
    """
    digest = hashlib.sha256()
    header: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "model": encoder.fingerprint,
        "dtype": str(encoder.dtype),
        "device": str(encoder.device.type),
        "shard_size": config.shard_size,
        "max_pixels": config.max_pixels,
    }
    if encoder.runtime != DEFAULT_RUNTIME:  # absent for torch: builds interrupted before
        header["runtime"] = encoder.runtime  # runtimes existed still resume
    digest.update(json.dumps(header, sort_keys=True).encode())
    for image in gallery.images if gallery else ():
        try:
            stat = image.path.stat()
            signature = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            signature = "missing"
        digest.update(f"I\0{image.id}\0{image.path}\0{signature}\0{image.captions}\n".encode())
    for caption in corpus.captions if corpus else ():
        digest.update(f"C\0{caption.id}\0{caption.caption}\0{caption.image_ref}\n".encode())
    return digest.hexdigest()


def _prepare_build_dir(root: Path, digest: str, config: BuildConfig) -> tuple[Path, str]:
    """A fresh ``.tmp-<version>`` directory, or with ``resume`` the newest one of these inputs."""
    version = new_version_name()
    build_dir = root / f"{TEMP_PREFIX}{version}"
    if config.resume:
        for candidate in sorted(root.glob(f"{TEMP_PREFIX}*"), reverse=True):
            try:
                record = json.loads((candidate / BUILD_RECORD).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if record.get("digest") == digest:
                os.rename(candidate, build_dir)  # a new name keeps version names in build order
                logger.info("resuming the interrupted build %s as %s", candidate.name, version)
                remove_stale_builds(root, keep=build_dir)
                return build_dir, version
        logger.warning("--resume: no interrupted build of these inputs and model; starting afresh")
    remove_stale_builds(root)
    build_dir.mkdir()
    record = {"digest": digest, "started_at": _now(), "config": config.to_dict()}
    (build_dir / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return build_dir, version


def _plan(
    encoder: PipelineEncoder,
    gallery: Gallery | None,
    corpus: CaptionCorpus | None,
    build_dir: Path,
    config: BuildConfig,
) -> BuildPlan:
    """Cut each modality into shards of ``config.shard_size`` positions under ``build_dir``."""
    on_gpu = encoder.device.type == "cuda"
    dim = int(encoder.embedding_dim)
    images = captions = None
    if gallery is not None:
        ids = [image.id for image in gallery.images]
        images = ImageJob(
            paths=[str(image.path) for image in gallery.images],
            store=ShardStore(build_dir / "shards" / "images", ids, config.shard_size, dim),
            batch_size=config.batch_size or (256 if on_gpu else 32),
            max_pixels=config.max_pixels,
            progress_interval_s=config.progress_interval_s,
        )
    if corpus is not None:
        ids = [caption.id for caption in corpus.captions]
        captions = CaptionJob(
            texts=[caption.caption for caption in corpus.captions],
            store=ShardStore(build_dir / "shards" / "captions", ids, config.shard_size, dim),
            batch_size=config.batch_size or (256 if on_gpu else 64),
            progress_interval_s=config.progress_interval_s,
        )
    return BuildPlan(images, captions)


def _finalize_images(job: ImageJob, gallery: Gallery, stats: EncodeStats) -> _Modality:
    positions, skipped_items = job.store.layout()
    skipped = list(skipped_items)
    if len(positions) == 0:
        reasons = Counter(item.reason for item in skipped)
        raise BuildError(
            f"no usable image among the {len(job.paths)} files of {gallery.source} "
            f"(skipped: {dict(reasons)}); CURRENT is unchanged"
        )
    # memory-mapped blocks, one per shard: the index builder streams them (IVF-PQ on disk)
    return _Modality(job.store.vector_blocks(), positions, skipped, stats)


@dataclass(frozen=True)
class _VersionContents:
    """What :func:`_write_version` wrote: the index entries and the rows."""

    indexes: dict[str, IndexEntry]
    image_rows: list[ImageRow]
    caption_rows: list[CaptionRow]


def _write_version(
    staged: Path,
    config: BuildConfig,
    gallery: Gallery | None,
    corpus: CaptionCorpus | None,
    images: _Modality | None,
    captions: _Modality | None,
    device: str,
) -> _VersionContents:
    """Write the faiss indexes and the metadata into ``staged``."""
    image_rows: list[ImageRow] = []
    caption_rows: list[CaptionRow] = []
    indexed_ids: list[str] = []
    if gallery is not None and images is not None:
        indexed_ids = [gallery.images[p].id for p in images.positions]
    if corpus is not None and captions is not None:
        chosen = [corpus.captions[p] for p in captions.positions]
        links = link_captions(chosen, indexed_ids)
        caption_rows = [
            CaptionRow(row, c.id, c.caption, link, c.image_ref)
            for row, (c, link) in enumerate(zip(chosen, links, strict=True))
        ]
    if gallery is not None and images is not None:
        linked: dict[str, list[str]] = {}
        for caption_row in caption_rows:
            if caption_row.image_id is not None:
                linked.setdefault(caption_row.image_id, []).append(caption_row.caption)
        for row, position in enumerate(images.positions):
            image = gallery.images[position]
            texts = tuple(dict.fromkeys([*image.captions, *linked.get(image.id, [])]))
            image_rows.append(ImageRow(row, image.id, str(image.path), texts, image.metadata))
    indexes = stage_version(
        staged,
        image_rows=image_rows,
        image_vectors=images.vectors if images else None,
        caption_rows=caption_rows,
        caption_vectors=captions.vectors if captions else None,
        index=config.index,
        policy=config.policy,
        device=device,
    )
    return _VersionContents(indexes, image_rows, caption_rows)


def _version_manifest(
    version: str,
    config: BuildConfig,
    encoder: PipelineEncoder,
    gallery: Gallery | None,
    corpus: CaptionCorpus | None,
    images: _Modality | None,
    captions: _Modality | None,
    contents: _VersionContents,
    build: BuildInfo,
) -> Manifest:
    """The manifest of a built version (``files`` is added when it is written)."""
    skipped = (*(images.skipped if images else []), *(captions.skipped if captions else []))
    check = encoder.check
    base = base_manifest(
        version,
        encoder.fingerprint,
        int(encoder.embedding_dim),
        contents.indexes,
        contents.image_rows,
        contents.caption_rows,
        runtime=encoder.runtime,
        runtime_check=None
        if check is None
        else RuntimeCheckFigures(check.min_cosine, check.mean_cosine, check.recall_drop),
    )
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, path=str(Path(config.model_dir).resolve())),
        counts=Counts(
            images=len(contents.image_rows),
            captions=len(contents.caption_rows),
            skipped=len(skipped),
            captions_linked_to_images=sum(r.image_id is not None for r in contents.caption_rows),
            ignored_files=gallery.ignored_files if gallery else 0,
        ),
        inputs=Inputs(
            images=_describe_source(gallery.source, gallery.format, len(gallery.images))
            if gallery
            else None,
            captions=_describe_source(corpus.source, corpus.format, len(corpus.captions))
            if corpus
            else None,
        ),
        skipped=skipped,
        skipped_by_reason=dict(Counter(item.reason for item in skipped)),
        build=build,
    )


def _rate(modality: _Modality | None) -> float:
    """Items encoded per second of one modality in this run (0.0 when none)."""
    stats = modality.stats if modality is not None else None
    return round(stats.encoded / stats.seconds, 2) if stats and stats.seconds else 0.0


def _describe_source(source: Path, kind: str, candidates: int) -> SourceInfo:
    return SourceInfo(path=str(Path(source).resolve()), format=kind, candidates=candidates)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def skipped_lines(manifest: Manifest, limit: int = 20) -> Sequence[str]:
    """Human lines for the skipped inputs of a manifest, at most ``limit`` plus a remainder line."""
    items = manifest.skipped or ()
    lines = [
        f"  skipped {item.path or item.id}: {item.reason} ({item.detail})" for item in items[:limit]
    ]
    if len(items) > limit:
        lines.append(f"  … and {len(items) - limit} more (see manifest.json)")
    return lines
