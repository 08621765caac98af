"""The query stages on their own: encode a batch, search a target index, hydrate its records."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from indexer.store import IndexVersion
from model.images import CorruptImageError
from service.errors import BadRequest, EncodeFailed, ModalityMissing
from service.metrics import ServiceMetrics
from service.retrieval import (
    CAPTIONS,
    IMAGES,
    EncodeBatch,
    Exclusion,
    Page,
    Scored,
    hydrate,
    require_target,
    retrieve,
    search,
    text_encoder,
)
from tests.service.conftest import ServiceEnv


def test_encode_batch_gives_one_unit_vector_per_input(shared_env: ServiceEnv) -> None:
    encoder = shared_env.encoder
    vectors = text_encoder(encoder, ServiceMetrics())(["a", "b", "c"])
    assert len(vectors) == 3 and all(v.shape == (encoder.embedding_dim,) for v in vectors)
    assert np.allclose(vectors[1], encoder.text_vector("b"))
    assert encoder.text_batches[-1] == 3  # one forward pass for the batch


def test_encode_batch_maps_failures_to_service_errors() -> None:
    def refuse(images: list[Image.Image], n: int) -> np.ndarray:
        raise CorruptImageError("truncated")

    def crash(texts: list[str], n: int) -> np.ndarray:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(BadRequest, match="truncated"):
        EncodeBatch("image", refuse, ServiceMetrics())([Image.new("RGB", (2, 2))])
    with pytest.raises(EncodeFailed, match=r"text encoder failed.*RuntimeError"):
        EncodeBatch("text", crash, ServiceMetrics())(["a"])


def test_search_then_hydrate_names_the_target_index(shared_env: ServiceEnv) -> None:
    gallery, encoder = shared_env.gallery, shared_env.encoder
    with IndexVersion.open(shared_env.root) as index:
        xq = encoder.text_vector(gallery.captions[4][1])  # image 2's first caption
        hits = search(index, IMAGES, xq, 3, ServiceMetrics(), "text")
        assert len(hits) == 3 and hits[0].retrieval_score == pytest.approx(1.0, abs=1e-4)
        found = hydrate(index, IMAGES, hits)
        assert found[0].record.id == gallery.image_ids[2]
        assert [f.retrieval_score for f in found] == [h.retrieval_score for h in hits]
        assert all(f.score == f.retrieval_score and f.teacher_score is None for f in found)
        # The same vector against the other target: captions, fewer than k when k is large.
        captions = retrieve(index, CAPTIONS, xq, 100, ServiceMetrics(), "text")
        assert len(captions) == len(gallery.captions)
        require_target(index, IMAGES)


def test_an_empty_target_is_refused_before_encoding() -> None:
    class NoImages:
        version = "v-empty"
        image_count = 0

    with pytest.raises(ModalityMissing, match="v-empty has no gallery images"):
        require_target(NoImages(), IMAGES)  # type: ignore[arg-type]


def test_search_leaves_out_the_excluded_and_still_returns_k(shared_env: ServiceEnv) -> None:
    gallery, encoder = shared_env.gallery, shared_env.encoder
    with IndexVersion.open(shared_env.root) as index:
        xq = encoder.text_vector(gallery.captions[4][1])  # image 2's vector: row 2 is nearest
        plain = search(index, IMAGES, xq, 3, ServiceMetrics(), "text")
        assert plain[0].row == 2
        by_row = search(
            index, IMAGES, xq, 3, ServiceMetrics(), "text", exclude=Exclusion(rows=frozenset({2}))
        )
        assert [hit.row for hit in by_row] == [
            hit.row for hit in search(index, IMAGES, xq, 4, ServiceMetrics(), "text")
        ][1:]
        copies = Exclusion(min_cosine=0.9999)
        assert [
            h.row for h in search(index, IMAGES, xq, 3, ServiceMetrics(), "text", exclude=copies)
        ] == [h.row for h in by_row]
        only_blue = search(
            index, IMAGES, xq, 6, ServiceMetrics(), "text", metadata_filter={"colour": "blue"}
        )
        assert sorted(hit.row for hit in only_blue) == [2, 5]


def test_a_page_drops_low_scores_then_skips_offset() -> None:
    results = [
        Scored(record=i, retrieval_score=score) for i, score in enumerate([0.9, 0.8, 0.1, 0.7, 0.6])
    ]
    cut = Page(k=2, offset=1, min_score=0.5).cut(results)  # type: ignore[arg-type]
    assert [r.record for r in cut] == [1, 3]  # 0.1 dropped before the offset counts
    assert Page(k=2, offset=4).cut(results) == results[4:]  # type: ignore[arg-type]
    assert Page(k=3, offset=2).depth == 5
