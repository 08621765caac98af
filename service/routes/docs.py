"""``GET /docs`` (Swagger UI), ``GET /redoc`` and ``GET /favicon.ico``, working offline.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so they are blank on a machine
without internet access. These pages load the same files from the ``fastapi-offline``
package, served under ``/docs-assets``.
"""

from __future__ import annotations

import io
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageDraw

ASSETS_PATH = "/docs-assets"
_ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
_FAVICON_PATH = "/favicon.ico"


def assets_app() -> StaticFiles:
    """The Swagger UI and ReDoc scripts and styles, to mount at :data:`ASSETS_PATH`."""
    return StaticFiles(directory=_ASSETS_DIR)


@lru_cache(maxsize=1)
def favicon_ico() -> bytes:
    """The site icon: a red disc and a blue square (the example query's motif), as ICO."""
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((1, 8, 15, 22), fill=(220, 30, 30))
    draw.rectangle((17, 8, 31, 22), fill=(30, 60, 220))
    buffer = io.BytesIO()
    image.save(buffer, format="ICO", sizes=[(16, 16), (32, 32)])
    return buffer.getvalue()


def build_router(title: str, openapi_url: str) -> APIRouter:
    """The documentation pages of an app titled ``title`` whose schema is at ``openapi_url``."""
    router = APIRouter(include_in_schema=False)

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", ""))

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        prefix = root(request)
        return get_swagger_ui_html(
            openapi_url=prefix + openapi_url,
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{prefix}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{prefix}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=prefix + _FAVICON_PATH,
        )

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        prefix = root(request)
        return get_redoc_html(
            openapi_url=prefix + openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=f"{prefix}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=prefix + _FAVICON_PATH,
            with_google_fonts=False,
        )

    @router.get(_FAVICON_PATH)
    async def favicon() -> Response:
        return Response(
            favicon_ico(),
            media_type="image/x-icon",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    return router
