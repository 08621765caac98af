"""EXIF orientation is applied to uploads: a photo stored sideways with an orientation tag is
encoded like the same photo physically rotated (real tiny model)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.uploads import decode_upload
from tests.service.conftest import TinyModelEnv

pytestmark = pytest.mark.slow


def _photo() -> Image.Image:
    """A non-square, asymmetric picture: orientation changes what the encoder sees."""
    image = Image.new("RGB", (96, 64), (235, 235, 235))
    image.paste((200, 30, 30), (0, 0, 48, 32))
    image.paste((30, 30, 200), (60, 40, 96, 64))
    image.paste((30, 160, 30), (10, 44, 30, 60))
    return image


def _jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation  # Orientation
    image.save(buffer, format="JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    return buffer.getvalue()


# EXIF orientation → the transpose that shows the stored pixels upright.
_UPRIGHT = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_270,
    8: Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_an_exif_rotated_photo_embeds_like_the_rotated_photo(
    tiny_model_env: TinyModelEnv, orientation: int
) -> None:
    stored = _photo()  # the pixels as the camera stored them
    tagged = _jpeg(stored, orientation)
    rotated = _jpeg(stored.transpose(_UPRIGHT[orientation]))  # physically upright, no tag
    model = tiny_model_env.model

    upright_from_tag = decode_upload(tagged, max_pixels=10_000)
    upright_from_pixels = decode_upload(rotated, max_pixels=10_000)
    assert upright_from_tag.size == upright_from_pixels.size
    embeddings = model.encode_images([upright_from_tag, upright_from_pixels, stored])
    cosine = float(embeddings[0] @ embeddings[1])
    assert cosine >= 0.99, cosine
    # ...and the tag mattered: ignoring it would fail the same threshold.
    assert float(embeddings[0] @ embeddings[2]) < 0.99


def test_the_endpoint_answers_the_same_for_tagged_and_rotated_photos(
    tiny_model_env: TinyModelEnv,
) -> None:
    stored = _photo()
    app = create_app(tiny_model_env.settings())
    with TestClient(app) as client:
        bodies = []
        for data in (_jpeg(stored, 6), _jpeg(stored.transpose(_UPRIGHT[6]))):
            response = client.post(
                "/search/captions?k=6", content=data, headers={"content-type": "image/jpeg"}
            )
            assert response.status_code == 200, response.text
            bodies.append({hit["id"]: hit["score"] for hit in response.json()["results"]})
    tagged, rotated = bodies
    assert set(tagged) == set(rotated)
    np.testing.assert_allclose([tagged[i] for i in tagged], [rotated[i] for i in tagged], atol=0.02)
