"""Index choice, exactness of flat search, and tuning of approximate indexes to the recall target."""

from __future__ import annotations

import math

import numpy as np
import pytest

from indexer.faiss_index import (
    RECALL_PLATEAU,
    IndexPolicy,
    SearchSettings,
    apply_search_settings,
    build_index,
    choose_kind,
    exact_neighbours,
    ivf_nlist,
    pq_layout,
    recall_at_k,
)


def clustered(n: int, d: int, seed: int = 0, clusters: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def test_auto_picks_flat_then_ivf_then_ivfpq() -> None:
    policy = IndexPolicy(flat_max_vectors=1000, memory_budget_bytes=10 * 1000 * 64 * 4)
    assert choose_kind(1000, 64, "auto", policy) == "flat"
    assert choose_kind(1001, 64, "auto", policy) == "ivf"
    assert choose_kind(10_001, 64, "auto", policy) == "ivfpq"  # float32 vectors over budget
    assert choose_kind(5, 64, "hnsw", policy) == "hnsw"  # an explicit choice wins
    with pytest.raises(ValueError, match="'annoy'"):
        choose_kind(5, 64, "annoy", policy)


def test_ivf_and_pq_layouts() -> None:
    assert ivf_nlist(1_000_000) == 4000
    assert ivf_nlist(20) == 1
    assert ivf_nlist(39 * 50) == 50  # at least 39 training points per list
    m, nbits = pq_layout(1_000_000, 768, 32 * 1_000_000)
    assert (m, nbits) == (24, 8) and 768 % m == 0  # 32 bytes per vector - 8 for the id
    assert pq_layout(100, 64, 10**9) == (16, 6)  # few vectors: fewer bits per code, m <= d/4


def test_recall_at_k_counts_shared_rows() -> None:
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    found = np.array([[2, 1, 9], [3, -1, -1]])
    assert recall_at_k(found, exact, 3) == pytest.approx(3 / 6)


def test_flat_index_equals_numpy_brute_force() -> None:
    xb = clustered(300, 16)
    xq = clustered(25, 16, seed=1)
    built = build_index(xb, "flat", IndexPolicy(tuning_queries=50))
    distances, rows = built.index.search(xq, 10)
    scores = xq @ xb.T
    np.testing.assert_array_equal(rows, np.argsort(-scores, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(distances, -np.sort(-scores, axis=1)[:, :10], atol=1e-5)
    assert built.recall_at_10 == 1.0 and built.params == {}


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_are_tuned_to_the_recall_target(kind: str) -> None:
    xb = clustered(4000, 32)
    policy = IndexPolicy(tuning_queries=200, target_recall=0.95)
    built = build_index(xb, kind, policy)
    assert built.recall_at_10 >= 0.95
    name = "nprobe" if kind == "ivf" else "efSearch"
    assert built.params[name] == built.tuning[-1][name]
    assert all(step["recall_at_10"] < 0.95 for step in built.tuning[:-1])  # the smallest that works
    # Recall holds on fresh queries the tuning never saw.
    rng = np.random.default_rng(7)
    fresh = xb[rng.choice(len(xb), 200, replace=False)] + 0.05 * rng.standard_normal(
        (200, 32)
    ).astype(np.float32)
    fresh = np.ascontiguousarray(
        fresh / np.linalg.norm(fresh, axis=1, keepdims=True), dtype=np.float32
    )
    _, found = built.index.search(fresh, 10)
    assert recall_at_k(found, exact_neighbours(fresh, xb, 10)) >= 0.9
    description = built.describe().to_dict()
    assert description["type"] == kind and description["recall_at_10"] >= 0.95
    assert description["layout"] == "in_memory" and "files" not in description


def test_an_unreachable_target_settles_on_the_recall_plateau() -> None:
    """IVF-PQ codes cap recall: rather than scanning every list for the last bit of it, the
    smallest nprobe within RECALL_PLATEAU of the best recall of the sweep is kept."""
    xb = clustered(4000, 32)
    built = build_index(xb, "ivfpq", IndexPolicy(tuning_queries=200, target_recall=1.0))
    recalls = [step["recall_at_10"] for step in built.tuning]
    assert max(recalls) < 1.0 and len(built.tuning) > 1
    chosen = next(s for s in built.tuning if s["recall_at_10"] >= max(recalls) - RECALL_PLATEAU)
    assert built.params["nprobe"] == chosen["nprobe"] == built.index.nprobe
    assert built.recall_at_10 == chosen["recall_at_10"]


def test_search_settings_are_restored_on_a_loaded_index() -> None:
    xb = clustered(2000, 16)
    built = build_index(xb, "ivf", IndexPolicy(tuning_queries=100))
    settings = SearchSettings.from_dict(built.describe().to_dict())
    import faiss

    copy = faiss.deserialize_index(faiss.serialize_index(built.index))
    faiss.extract_index_ivf(copy).nprobe = 1
    apply_search_settings(copy, settings)
    assert faiss.extract_index_ivf(copy).nprobe == built.params["nprobe"]


def test_ivfpq_builds_and_records_its_layout_and_recall() -> None:
    xb = clustered(3000, 32)
    policy = IndexPolicy(tuning_queries=100, memory_budget_bytes=3000 * 16)
    built = build_index(xb, "ivfpq", policy)
    assert built.params["m"] * built.params["nbits"] / 8 <= 16 - 8 or built.params["m"] == 1
    assert 0.0 < built.recall_at_10 <= 1.0
    assert math.isfinite(built.describe().to_dict()["recall_at_10"])


def test_tuning_uses_the_other_modality_when_given() -> None:
    xb = clustered(500, 16)
    other = clustered(120, 16, seed=3)
    built = build_index(xb, "flat", IndexPolicy(tuning_queries=100), other=other)
    assert built.query_source == "other_modality" and built.recall_queries == 100


def test_build_index_checks_its_input() -> None:
    with pytest.raises(ValueError, match="float64"):
        build_index(np.zeros((3, 4)), "flat", IndexPolicy())


def test_a_cuda_request_without_gpu_faiss_trains_on_the_cpu() -> None:
    import faiss

    xb = clustered(1000, 16)
    built = build_index(xb, "ivf", IndexPolicy(tuning_queries=50), device="cuda")
    assert built.index.ntotal == 1000 and built.recall_at_10 >= 0.95
    assert "Gpu" not in type(built.index).__name__  # saved indexes are CPU indexes
    faiss.serialize_index(built.index)


def test_a_single_vector_still_builds() -> None:
    for kind in ("flat", "ivf", "hnsw", "ivfpq"):
        built = build_index(clustered(1, 8), kind, IndexPolicy())
        assert built.index.ntotal == 1 and built.recall_at_10 == 1.0
