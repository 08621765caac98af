"""``POST /admin/reload``: serve the version ``CURRENT`` names, after validating it.

Only mounted when ``VLD_RELOAD_TOKEN`` is set; callers send ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.deps import StateDep
from service.errors import Unauthorized, error_responses
from service.schemas import ReloadResponse
from service.state import reload_served_index

router = APIRouter(prefix="/admin", tags=["admin"])
_bearer = HTTPBearer(auto_error=False, description="The VLD_RELOAD_TOKEN value.")


async def require_reload_token(
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    token = state.settings.reload_token
    if token is None:  # the router is not mounted without a token; belt and braces
        raise Unauthorized("reloading is disabled (no VLD_RELOAD_TOKEN configured)")
    if credentials is None:
        raise Unauthorized("missing 'Authorization: Bearer <token>' header")
    if not secrets.compare_digest(
        credentials.credentials.encode("utf-8", "replace"),
        token.get_secret_value().encode("utf-8"),
    ):
        raise Unauthorized("wrong bearer token")


@router.post(
    "/reload",
    response_model=ReloadResponse,
    summary="Load, validate and swap in the published index version",
    description=(
        "Reads CURRENT, validates that version (checksums, counts, model fingerprint, "
        "dimension, encoder runtime, self-query) in a worker thread, then swaps it in with one reference "
        "assignment: requests already running finish on the old version. A version that fails "
        "validation is refused with 409 and the old one keeps serving."
    ),
    responses=error_responses(401, 409, 503),
    dependencies=[Depends(require_reload_token)],
)
async def reload_index(state: StateDep) -> ReloadResponse:
    outcome = await reload_served_index(state)
    return ReloadResponse(
        status="reloaded" if outcome.status == "reloaded" else "unchanged",
        index_version=outcome.version,
        previous_version=outcome.previous_version,
    )
