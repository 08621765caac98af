"""The FastAPI application: ``create_app(settings)``, and ``app_from_env`` for uvicorn.

Building the app reads settings only; the lifespan hook loads the model (in the encoder
runtime ``VLD_RUNTIME``), the teacher (if configured) and the published index, starts one micro-batcher per modality and, if configured,
polls ``CURRENT``. Importing this module builds nothing: there is no module-level app; run
``uvicorn --factory service.app:app_from_env`` (or ``vldeformer-serve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI
from PIL import Image
from starlette.types import ASGIApp, Receive, Scope, Send

from indexer.store import IndexVersion, read_current
from service.batching import BatchingConfig, MicroBatcher
from service.errors import IndexRefused, install_error_handlers
from service.index_holder import IndexHolder
from service.metrics import MetricsMiddleware, ServiceMetrics
from service.rerank import Reranker, load_reranker
from service.retrieval import EncodeBatch, Encoder, InputT, image_encoder, text_encoder
from service.routes import admin, docs, health, image_search, images, pages, search
from service.search_batch import SearchStage, search_config
from service.settings import (
    Settings,
    SettingsError,
    env_name,
    load_settings,
    require_serving_paths,
)
from service.state import ServiceState, reload_served_index
from service.uploads import BodySizeLimitMiddleware

logger = logging.getLogger(__name__)

EncoderLoader = Callable[[Settings], Encoder]
RerankerLoader = Callable[[Settings], Reranker]


def load_model(settings: Settings) -> Encoder:
    """The decomposed VLDeformer from ``settings.model_dir`` in the encoder runtime
    ``settings.runtime`` (:func:`model.runtime.load_encoder`) on ``settings.device``.

    ``auto`` is torch on a GPU, else the fastest runtime that passes its check against torch
    (:func:`model.runtime.pick_default_runtime`). The ONNX runtimes run on the CPU, where
    ``VLD_DEVICE=auto`` puts them. Raises :class:`model.runtime.RuntimeUnavailable` when the
    runtime named cannot be used; ``auto`` falls back to torch with a warning instead.
    """
    import torch

    # Heavy (torch + transformers): only when serving.
    from model.backbone import resolve_device
    from model.runtime import RuntimeUnavailable, load_encoder, pick_default_runtime

    model_dir, _ = require_serving_paths(settings)
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    runtime: str = settings.runtime
    if runtime == "auto":
        on_cpu = resolve_device(settings.device).type == "cpu"
        runtime = pick_default_runtime(model_dir) if on_cpu else "torch"
    device = "cpu" if runtime != "torch" and settings.device == "auto" else settings.device
    try:
        return load_encoder(model_dir, runtime, device=device, threads=settings.torch_threads)
    except RuntimeUnavailable as exc:
        if settings.runtime != "auto":
            raise
        logger.warning(
            "%s=auto: the %s runtime is unavailable (%s); serving with torch",
            env_name("runtime"),
            runtime,
            exc,
        )
        return load_encoder(model_dir, "torch", device=settings.device)


def load_teacher(settings: Settings) -> Reranker:
    """The early-interaction teacher from ``settings.teacher_dir``, wrapped as a re-ranker."""
    assert settings.teacher_dir is not None
    return load_reranker(
        settings.teacher_dir,
        device=settings.device,
        cache_size=settings.rerank_cache_size,
        max_image_pixels=settings.max_image_pixels,
    )


async def _start_reranker(state: ServiceState, load: RerankerLoader) -> None:
    """Load the teacher if one is configured; a failure leaves the service without re-ranking."""
    teacher_dir = state.settings.teacher_dir
    if teacher_dir is None:
        return
    try:
        reranker = await asyncio.to_thread(load, state.settings)
    except Exception as exc:
        # /readyz is public: say what failed, not where (no server paths); the log has both.
        state.rerank_problem = (
            f"the teacher ({teacher_dir.name}) failed to load: {type(exc).__name__}"
        )
        logger.error(
            "serving WITHOUT re-ranking: the teacher at %s failed to load: %s", teacher_dir, exc
        )
        return
    state.reranker, state.rerank_problem = reranker, None
    logger.info(
        "teacher loaded from %s for re-ranking (fingerprint %s…)",
        teacher_dir,
        reranker.fingerprint[:12],
    )


def _batching_config(settings: Settings) -> BatchingConfig:
    window_s = settings.batch_window_ms / 1000.0
    return BatchingConfig(
        max_batch_size=settings.max_batch_size if window_s > 0 else 1,
        window_s=window_s,
        max_wait_s=max(window_s, settings.batch_max_wait_ms / 1000.0),
        capacity=settings.queue_size,
        retry_after_s=settings.retry_after_s,
    )


def _encoder_batcher(
    process: EncodeBatch[InputT], config: BatchingConfig, metrics: ServiceMetrics
) -> MicroBatcher[InputT, np.ndarray]:
    """The micro-batcher of one encoder, with its queue metrics."""
    return MicroBatcher(
        process.modality,
        process,
        config,
        on_depth=metrics.queue_depth.labels(process.modality).set,
        on_reject=metrics.rejected.labels(process.modality).inc,
    )


def _warm_up(encoder: Encoder) -> None:
    """One pass per modality before readiness, so the first user query pays no set-up cost."""
    encoder.encode_text(["warm up"], batch_size=1)
    encoder.encode_images([Image.new("RGB", (64, 64), "white")], batch_size=1)


async def _poll_current(state: ServiceState, interval_s: float) -> None:
    """Reload whenever CURRENT names a version that is neither served nor already refused."""
    holder = state.holder
    assert holder is not None
    while True:
        await asyncio.sleep(interval_s)
        try:
            published = await asyncio.to_thread(read_current, holder.root)
            if published and published != holder.version and published not in holder.refused:
                await reload_served_index(state)
        except IndexRefused:
            pass  # logged by the holder; the old version keeps serving
        except Exception:
            logger.exception("polling %s/CURRENT failed", holder.root)


async def _start(
    state: ServiceState, load_encoder: EncoderLoader, load_reranker: RerankerLoader
) -> None:
    settings = state.settings
    try:
        _, index_root = require_serving_paths(settings)
        started = time.monotonic()
        encoder = await asyncio.to_thread(load_encoder, settings)
    except Exception as exc:
        logger.error("cannot start: %s", exc)
        raise
    await asyncio.to_thread(_warm_up, encoder)
    state.encoder = encoder
    logger.info(
        "model loaded from %s in %.1f s (%s runtime, dim %d, fingerprint %s…)",
        settings.model_dir,
        time.monotonic() - started,
        encoder.runtime,
        encoder.embedding_dim,
        encoder.fingerprint[:12],
    )

    await _start_reranker(state, load_reranker)

    def on_swap(index: IndexVersion) -> None:
        state.metrics.set_index(index.version, index.image_count, index.caption_count)

    state.holder = IndexHolder(
        index_root,
        fingerprint=encoder.fingerprint,
        dim=encoder.embedding_dim,
        runtime=encoder.runtime,
        check=encoder.check,
        on_swap=on_swap,
    )
    config = _batching_config(settings)
    metrics = state.metrics
    # One micro-batcher per encoder; a new query kind reuses one of them.
    state.text_batcher = _encoder_batcher(text_encoder(encoder, metrics), config, metrics)
    state.image_batcher = _encoder_batcher(image_encoder(encoder, metrics), config, metrics)
    state.search = SearchStage(metrics, search_config(config))
    await state.text_batcher.start()
    await state.image_batcher.start()
    await state.search.start()
    try:
        await asyncio.to_thread(state.holder.reload, verify=settings.verify_on_start)
    except Exception as exc:
        logger.error("NOT READY: %s (/readyz answers 503 until a valid version is loaded)", exc)
        metrics.reloads.labels("refused").inc()
    else:
        metrics.reloads.labels("reloaded").inc()
        state.ready_at = time.monotonic()
        logger.info("ready %.2f s after the app started", state.ready_at - state.started_at)


async def _stop(state: ServiceState) -> None:
    for batcher in (state.text_batcher, state.image_batcher):
        if batcher is not None:
            await batcher.stop()
    if state.search is not None:
        await state.search.stop()
    if state.holder is not None:
        # In a thread: close() waits for a reload thread still running (a cancelled poller's).
        await asyncio.to_thread(state.holder.close)
    if state.reranker is not None and hasattr(state.reranker, "close"):
        state.reranker.close()


def create_app(
    settings: Settings | None = None,
    *,
    load_encoder: EncoderLoader | None = None,
    load_reranker: RerankerLoader | None = None,
) -> FastAPI:
    """Build the app. Nothing heavy happens here; the lifespan loads the model and index.

    ``load_encoder`` replaces :func:`load_model` and ``load_reranker`` :func:`load_teacher`
    (tests pass fakes); the teacher is loaded only when ``settings.teacher_dir`` is set.
    """
    settings = settings if settings is not None else load_settings()
    metrics = ServiceMetrics()
    state = ServiceState(settings=settings, metrics=metrics)
    loader = load_encoder or load_model
    reranker_loader = load_reranker or load_teacher

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.started_at = time.monotonic()
        await _start(state, loader, reranker_loader)
        poller = (
            asyncio.create_task(_poll_current(state, settings.poll_interval_s))
            if settings.poll_interval_s > 0
            else None
        )
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            await _stop(state)

    app = FastAPI(
        title="vldeformer",
        version="0.1.0",
        summary="Cross-modal retrieval: text → images, image → captions, more like this.",
        description=(
            "Queries are encoded on the fly by the decomposed VLDeformer (one ViLT encoding a "
            "text or an image alone) and searched in the index the indexer published. Every "
            'error has the body `{"error": {"code", "message", "details"}}`.'
        ),
        lifespan=lifespan,
        docs_url=None,  # served offline by routes/docs.py
        redoc_url=None,
    )
    app.state.service = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts 413s too
    app.include_router(search.build_router(settings))
    app.include_router(image_search.build_router(settings))
    app.include_router(images.router)
    app.include_router(health.router)
    if settings.reload_token is not None:
        app.include_router(admin.router)
    app.include_router(pages.router)
    app.include_router(docs.build_router(app.title, app.openapi_url or "/openapi.json"))
    app.mount(docs.ASSETS_PATH, docs.assets_app(), name="docs-assets")
    return app


class _RefuseStartup:
    """ASGI middleware that fails the lifespan start-up with one line (no traceback)."""

    def __init__(self, app: ASGIApp, message: str) -> None:
        self.app = app
        self.message = message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        message = await receive()
        if message["type"] == "lifespan.startup":
            # uvicorn logs this message alone, then "Application startup failed. Exiting."
            await send({"type": "lifespan.startup.failed", "message": self.message})


def app_from_env() -> FastAPI:
    """The app with settings from the ``VLD_*`` environment, for ``uvicorn --factory``.

    Bad settings do not raise here (uvicorn would print a traceback): the returned app fails
    its lifespan start-up with one line naming the variable to fix.
    """
    try:
        settings = load_settings()
        require_serving_paths(settings)
        return create_app(settings)
    except SettingsError as exc:
        # Importing must not fail on bad environment values; starting must, in one line.
        misconfigured = FastAPI(title="vldeformer (misconfigured)")
        misconfigured.add_middleware(_RefuseStartup, message=f"error: {exc}")
        return misconfigured
