"""The batched search stage: concurrent unfiltered queries share one FAISS call, each answered
exactly as its own search would be; filtered queries, other versions and failures stay apart."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx
import numpy as np
import pytest

from indexer.store import IndexVersion, ModalityMissingError, RowSelection
from service.app import create_app
from service.batching import BatchingConfig
from service.errors import ModalityMissing
from service.metrics import ServiceMetrics
from service.retrieval import IMAGES, Exclusion, Scored, Target, retrieve
from service.search_batch import SearchStage
from tests.service.conftest import ServiceEnv
from tests.service.helpers import publish_vectors


@dataclass
class Call:
    index: IndexVersion
    nq: int  # query vectors in the one FAISS call
    k: int
    selection: RowSelection | None


class CountingSearch:
    """IMAGES with its FAISS search counted; ``fail`` makes every search raise it, ``poison``
    makes a search raise when any of its query vectors is all zeros."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[Call] = []
        self.record_reads = 0  # metadata reads of the hydrate stage
        self.fail = fail
        self.target: Target[Any] = replace(IMAGES, search=self.search, records=self.records)

    def records(self, index: IndexVersion, rows: Sequence[int]) -> list[Any]:
        self.record_reads += 1
        return IMAGES.records(index, rows)

    def search(
        self, index: IndexVersion, xq: np.ndarray, k: int, selection: RowSelection | None
    ) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(Call(index, xq.shape[0], k, selection))
        if self.fail is not None:
            raise self.fail
        if not np.abs(xq).sum(axis=1).all():
            raise RuntimeError("a zero query vector")
        return IMAGES.search(index, xq, k, selection)


CONFIG = BatchingConfig(max_batch_size=32, window_s=0.01, capacity=64, retry_after_s=1)


def run_concurrently(counting: CountingSearch, queries: Sequence[dict[str, Any]]) -> list[Any]:
    """Submit ``queries`` (keyword arguments of :meth:`SearchStage.retrieve`) together; each
    result or exception in order."""

    async def scenario() -> list[Any]:
        stage = SearchStage(ServiceMetrics(), CONFIG, targets=(counting.target,))
        await stage.start()
        try:
            return await asyncio.gather(
                *(stage.retrieve(target=counting.target, modality="text", **q) for q in queries),
                return_exceptions=True,
            )
        finally:
            await stage.stop()

    return asyncio.run(scenario())


def alone(index: IndexVersion, xq: np.ndarray, k: int, **options: Any) -> list[Scored[Any]]:
    return retrieve(index, IMAGES, xq, k, ServiceMetrics(), "text", **options)


def assert_same(found: list[Scored[Any]], expected: list[Scored[Any]]) -> None:
    assert [r.record.id for r in found] == [r.record.id for r in expected]
    assert [r.retrieval_score for r in found] == pytest.approx(
        [r.retrieval_score for r in expected], abs=1e-5
    )


def query_vectors(env: ServiceEnv) -> list[np.ndarray]:
    return [env.encoder.text_vector(text) for _, text, _ in env.gallery.captions]


def test_concurrent_queries_share_one_search_and_each_gets_its_own_results(
    shared_env: ServiceEnv,
) -> None:
    counting = CountingSearch()
    vectors = query_vectors(shared_env)[:5]
    depths = [1, 3, 2, 6, 4]  # searched at the largest, each cut to its own
    with IndexVersion.open(shared_env.root) as index:
        queries = [
            {"index": index, "xq": xq, "k": k} for xq, k in zip(vectors, depths, strict=True)
        ]
        copies = Exclusion(min_cosine=0.9999)  # an upload of a gallery image leaves it out
        queries.append({"index": index, "xq": vectors[0], "k": 3, "exclude": copies})
        results = run_concurrently(counting, queries)
        assert [(c.nq, c.k, c.selection) for c in counting.calls] == [(6, 3 + copies.slack, None)]
        assert counting.record_reads == 1  # one metadata read for the whole batch
        for query, found in zip(queries, results, strict=True):
            assert_same(found, alone(**query))
        assert len(results[3]) == 6 and results[-1][0].record.id != results[0][0].record.id


def test_a_filtered_query_searches_alone_with_its_selection(shared_env: ServiceEnv) -> None:
    counting = CountingSearch()
    vectors = query_vectors(shared_env)[:4]
    with IndexVersion.open(shared_env.root) as index:
        queries = [{"index": index, "xq": xq, "k": 3} for xq in vectors]
        queries[2]["metadata_filter"] = {"colour": "blue"}
        results = run_concurrently(counting, queries)
        shapes = sorted((c.nq, c.selection is None) for c in counting.calls)
        assert shapes == [(1, False), (3, True)]
        for query, found in zip(queries, results, strict=True):
            assert_same(found, alone(**query))
        assert {r.record.metadata["colour"] for r in results[2]} == {"blue"}


def test_queries_of_different_index_versions_are_not_mixed(service_env: ServiceEnv) -> None:
    gallery = service_env.gallery
    with IndexVersion.open(service_env.root) as old:
        rows = list(range(old.image_count))
        reversed_vectors = old.reconstruct("images", rows)[::-1]  # row i gets image n-1-i's
        new_version = publish_vectors(
            service_env.root,
            fingerprint=old.fingerprint,
            image_ids=gallery.image_ids,
            image_paths=gallery.image_paths,
            image_vectors=reversed_vectors,
            captions=gallery.captions,
            caption_vectors=old.reconstruct("captions", list(range(old.caption_count))),
        )
        with IndexVersion.open(service_env.root, new_version) as new:
            counting = CountingSearch()
            xq = query_vectors(service_env)[0]
            queries = [{"index": v, "xq": xq, "k": 2} for v in (old, new, old, new)]
            results = run_concurrently(counting, queries)
            assert sorted((c.index.version, c.nq) for c in counting.calls) == sorted(
                [(old.version, 2), (new.version, 2)]
            )
            for query, found in zip(queries, results, strict=True):
                assert_same(found, alone(**query))
            assert results[0][0].record.id != results[1][0].record.id


def test_a_failed_batch_search_is_reported_to_each_of_its_queries(
    shared_env: ServiceEnv,
) -> None:
    vectors = query_vectors(shared_env)[:3]
    with IndexVersion.open(shared_env.root) as index:
        queries = [{"index": index, "xq": xq, "k": 2} for xq in vectors]
        crashed = run_concurrently(CountingSearch(RuntimeError("faiss exploded")), queries)
        assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in crashed)
        missing = run_concurrently(CountingSearch(ModalityMissingError("no images")), queries)
        assert all(isinstance(r, ModalityMissing) for r in missing)


def test_one_bad_query_does_not_fail_its_batch(shared_env: ServiceEnv) -> None:
    counting = CountingSearch()
    vectors = query_vectors(shared_env)[:3]
    with IndexVersion.open(shared_env.root) as index:
        queries = [{"index": index, "xq": xq, "k": 2} for xq in vectors]
        queries.insert(1, {"index": index, "xq": np.zeros_like(vectors[0]), "k": 2})
        results = run_concurrently(counting, queries)
        assert counting.calls[0].nq == 4  # tried together first, then each alone
        assert isinstance(results[1], RuntimeError)
        for query, found in zip(queries[:1] + queries[2:], results[:1] + results[2:], strict=True):
            assert_same(found, alone(**query))


def test_concurrent_requests_share_search_batches(service_env: ServiceEnv) -> None:
    """Through the app: text queries encoded in one batch are searched in one FAISS call."""
    settings = service_env.settings(batch_window_ms=200, batch_max_wait_ms=2000)
    app = create_app(settings, load_encoder=lambda s: service_env.encoder)
    texts = [text for _, text, _ in service_env.gallery.captions[:8]]

    async def scenario() -> tuple[list[httpx.Response], str]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                responses = await asyncio.gather(
                    *(client.post("/search/images", json={"text": t, "k": 2}) for t in texts)
                )
                return responses, (await client.get("/metrics")).text

    responses, metrics = asyncio.run(scenario())
    assert all(response.status_code == 200 for response in responses)
    assert 'vld_search_batch_size_sum{index="images"} 8.0' in metrics
    assert 'vld_search_batch_size_count{index="images"} 1.0' in metrics
