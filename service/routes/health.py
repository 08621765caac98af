"""Operations: ``GET /healthz`` (alive), ``GET /readyz`` (model + index loaded), ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service.deps import StateDep
from service.errors import NotReady, error_responses
from service.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=HealthResponse, summary="Liveness: the process answers")
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    summary="Readiness: the model and an index are loaded",
    description="503 until both are loaded, or while the published index is refused "
    "(fingerprint, dimension or encoder runtime mismatch, failed checks); the message says "
    "why.",
    responses=error_responses(503),
)
async def readyz(state: StateDep) -> ReadyResponse:
    encoder, holder = state.encoder, state.holder
    if encoder is None or holder is None:
        raise NotReady("the model is not loaded")
    index = holder.current
    if index is None:
        raise NotReady(f"no index is being served: {holder.problem}")
    return ReadyResponse(
        index_version=index.version,
        model_fingerprint=encoder.fingerprint,
        embedding_dim=encoder.embedding_dim,
        runtime=encoder.runtime,
        index_runtime=index.runtime,
        image_count=index.image_count,
        caption_count=index.caption_count,
        rerank_available=state.reranker is not None,
        teacher_fingerprint=state.reranker.fingerprint if state.reranker is not None else None,
        rerank_problem=state.rerank_problem,
        metadata_fields={name: f.type for name, f in index.metadata_fields.items()},
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Requests and latency per endpoint and status, encode and search time, batch "
    "sizes, queue depth, index size and version, in the Prometheus text format.",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
