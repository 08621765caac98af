"""/docs, /redoc and /favicon.ico work offline: every file the pages load is served here."""

from __future__ import annotations

import io
import re

import pytest
from fastapi.testclient import TestClient
from PIL import Image


@pytest.mark.parametrize(
    ("page", "script"), [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")]
)
def test_docs_pages_load_only_local_assets(
    shared_client: TestClient, page: str, script: str
) -> None:
    response = shared_client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    urls = re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']""", html)
    urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html)  # the schema URL in the script
    assert urls, html
    assert not [url for url in urls if "//" in url], "a page must not load from another host"
    assert "fonts.googleapis" not in html and "cdn." not in html
    assert any(url.endswith(script) for url in urls)
    for url in urls:
        asset = shared_client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url


def test_docs_pages_are_not_in_the_schema(shared_client: TestClient) -> None:
    paths = shared_client.get("/openapi.json").json()["paths"]
    assert not {"/docs", "/redoc", "/favicon.ico"} & set(paths)


def test_favicon_is_an_icon(shared_client: TestClient) -> None:
    response = shared_client.get("/favicon.ico")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/x-icon"
    with Image.open(io.BytesIO(response.content)) as icon:
        assert icon.format == "ICO" and icon.size[0] >= 16


def test_an_unknown_asset_is_a_json_404(shared_client: TestClient) -> None:
    response = shared_client.get("/docs-assets/nope.js")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
