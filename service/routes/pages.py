"""``GET /``: the search page (plain HTML + JS, no build step); ``GET /examples/query.png``."""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from PIL import Image, ImageDraw

from service.deps import SettingsDep
from service.settings import Settings

router = APIRouter(tags=["pages"])
_PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"


@lru_cache(maxsize=1)
def _page_html() -> str:
    return _PAGE.read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def example_png() -> bytes:
    """A small valid query image (a red disc left of a blue square on white), as PNG bytes."""
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 20, 28, 44), fill=(220, 30, 30))
    draw.rectangle((36, 20, 60, 44), fill=(30, 60, 220))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render_page(settings: Settings) -> str:
    """The page with this deployment's limits in its inputs (``{{max_k}}``…), so the browser
    refuses what the server would."""
    limits = {
        "max_k": settings.max_k,
        "max_text_chars": settings.max_text_chars,
        "text_k": min(12, settings.max_k),
        "image_k": min(10, settings.max_k),
        "rerank_checked": "checked" if settings.rerank_default else "",
    }
    html = _page_html()
    for name, value in limits.items():
        html = html.replace("{{" + name + "}}", str(value))
    return html


@router.get("/", response_class=HTMLResponse, summary="The search page")
async def index_page(settings: SettingsDep) -> HTMLResponse:
    return HTMLResponse(render_page(settings), headers={"Cache-Control": "no-cache"})


@router.get(
    "/examples/query.png",
    response_class=Response,
    summary="An example query image for POST /search/captions",
    responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}},
)
async def example_query_image() -> Response:
    return Response(example_png(), media_type="image/png")
