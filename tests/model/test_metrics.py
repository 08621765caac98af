"""Recall metrics against an independent brute-force ranking, ties and 5-caption layout included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.metrics import (
    image_to_text_ranks,
    mean_metrics,
    protocol_folds,
    remap_to_fold,
    retrieval_metrics,
    text_to_image_ranks,
)


def _pessimistic_rank(scores: list[float], is_positive: list[bool]) -> int:
    """Sort items by score, negatives before positives on equal scores; first positive's index."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], is_positive[j]))
    return next(position for position, j in enumerate(order) if is_positive[j])


def _brute_force_metrics(sim_i2t: np.ndarray, caption_to_image: np.ndarray) -> dict[str, float]:
    n_images, n_captions = sim_i2t.shape
    i2t = [
        _pessimistic_rank(
            [float(sim_i2t[i, c]) for c in range(n_captions)],
            [int(caption_to_image[c]) == i for c in range(n_captions)],
        )
        for i in range(n_images)
    ]
    t2i = [
        _pessimistic_rank(
            [float(sim_i2t[i, c]) for i in range(n_images)],
            [int(caption_to_image[c]) == i for i in range(n_images)],
        )
        for c in range(n_captions)
    ]
    metrics: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            metrics[f"{name}_r{k}"] = 100.0 * sum(rank < k for rank in ranks) / len(ranks)
    recalls = [value for value in metrics.values()]
    metrics["rsum"] = sum(recalls)
    metrics["mean_recall"] = sum(recalls) / 6
    return metrics


def _five_caption_layout(n_images: int, rng: np.random.Generator, shuffle: bool) -> np.ndarray:
    mapping = np.repeat(np.arange(n_images), 5)  # Karpathy order: image by image
    return rng.permutation(mapping) if shuffle else mapping


@pytest.mark.parametrize("levels", [None, 2, 3, 6])  # None: continuous scores, no ties
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_brute_force_on_random_matrices(
    levels: int | None, shuffle: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    n_images = int(rng.integers(3, 25))
    caption_to_image = _five_caption_layout(n_images, rng, shuffle)
    shape = (n_images, caption_to_image.size)
    if levels is None:
        sim = rng.standard_normal(shape).astype(np.float32)
    else:  # few distinct values: ties everywhere, among positives and across them
        sim = rng.integers(0, levels, size=shape).astype(np.float32)
    got = retrieval_metrics(sim, caption_to_image)
    expected = _brute_force_metrics(sim, caption_to_image)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


@settings(max_examples=60, deadline=None)
@given(
    n_images=st.integers(1, 8),
    extra_captions=st.lists(st.integers(0, 7), max_size=12),
    data=st.data(),
)
def test_metrics_match_brute_force_for_any_layout(
    n_images: int, extra_captions: list[int], data: st.DataObject
) -> None:
    # Every image has >= 1 caption; extra captions go to arbitrary images, in arbitrary order.
    mapping = np.array(
        list(range(n_images)) + [c % n_images for c in extra_captions], dtype=np.int64
    )
    mapping = mapping[data.draw(st.permutations(range(mapping.size)))]
    values = data.draw(
        st.lists(
            st.sampled_from([-1.0, 0.0, 0.5, 1.0]),
            min_size=mapping.size * n_images,
            max_size=mapping.size * n_images,
        )
    )
    sim = np.array(values, dtype=np.float32).reshape(n_images, mapping.size)
    got = retrieval_metrics(sim, mapping)
    expected = _brute_force_metrics(sim, mapping)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_ties_count_against_the_query() -> None:
    caption_to_image = np.repeat(np.arange(4), 5)
    constant = np.zeros((4, 20), dtype=np.float32)
    metrics = retrieval_metrics(constant, caption_to_image)
    assert metrics["i2t_r1"] == 0.0 and metrics["t2i_r1"] == 0.0
    # R@10 for i2t: 15 negatives tie with the positives, so rank 15 >= 10.
    assert metrics["i2t_r10"] == 0.0
    # t2i: 3 tied negative images, rank 3 < 5.
    assert metrics["t2i_r5"] == 100.0


def test_positives_tied_with_each_other_do_not_hurt() -> None:
    caption_to_image = np.repeat(np.arange(3), 5)
    sim = (caption_to_image[None, :] == np.arange(3)[:, None]).astype(np.float32)
    metrics = retrieval_metrics(sim, caption_to_image)
    assert all(metrics[key] == 100.0 for key in metrics if key.startswith(("i2t", "t2i")))
    assert metrics["rsum"] == 600.0
    assert metrics["mean_recall"] == 100.0


def test_hand_example_ranks() -> None:
    # 2 images, 4 captions: captions 0, 2 belong to image 0, captions 1, 3 to image 1.
    caption_to_image = np.array([0, 1, 0, 1])
    sim = np.array(
        [
            [0.1, 0.9, 0.5, 0.5],  # image 0: best own caption 0.5; 0.9 and tied 0.5 above -> 2
            [0.3, 0.2, 0.4, 0.8],  # image 1: best own 0.8; nothing above -> 0
        ],
        dtype=np.float32,
    )
    assert image_to_text_ranks(sim, caption_to_image).tolist() == [2, 0]
    # caption 0: own 0.1 vs 0.3 -> 1; caption 1: 0.2 vs 0.9 -> 1; caption 2: 0.5 vs 0.4 -> 0;
    # caption 3: 0.8 vs 0.5 -> 0
    assert text_to_image_ranks(sim.T, caption_to_image).tolist() == [1, 1, 0, 0]
    metrics = retrieval_metrics(sim, caption_to_image)
    assert metrics["i2t_r1"] == 50.0
    assert metrics["t2i_r1"] == 50.0
    assert metrics["i2t_r5"] == 100.0


def test_separate_t2i_scores_are_used() -> None:
    caption_to_image = np.array([0, 1])
    sim_i2t = np.eye(2, dtype=np.float32)
    wrong_t2i = 1.0 - np.eye(2, dtype=np.float32)
    metrics = retrieval_metrics(sim_i2t, caption_to_image, sim_t2i=wrong_t2i)
    assert metrics["i2t_r1"] == 100.0
    assert metrics["t2i_r1"] == 0.0


@pytest.mark.parametrize(
    ("sim", "mapping", "message"),
    [
        (np.zeros((2, 3)), np.array([0, 1]), "shape"),
        (np.zeros((2, 2)), np.array([0, 2]), r"\[0, 2\)"),
        (np.zeros((3, 2)), np.array([0, 1]), "no caption"),
        (np.array([[np.nan, 0.0], [0.0, 0.0]]), np.array([0, 1]), "NaN"),
        (np.zeros((2, 2)), np.array([0.0, 1.0]), "integer"),
    ],
)
def test_invalid_inputs_are_rejected(sim: np.ndarray, mapping: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(sim, mapping)


def test_protocol_folds() -> None:
    assert [fold.tolist() for fold in protocol_folds(7, "full")] == [list(range(7))]
    coco_1k = protocol_folds(5000, "1k")
    assert len(coco_1k) == 5
    assert np.array_equal(np.concatenate(coco_1k), np.arange(5000))
    flickr_1k = protocol_folds(1000, "1k")
    assert len(flickr_1k) == 1 and flickr_1k[0].size == 1000
    assert protocol_folds(5200, "5k")[0].size == 5000
    with pytest.raises(ValueError, match="at least 1000"):
        protocol_folds(999, "1k")
    with pytest.raises(ValueError, match="at least 5000"):
        protocol_folds(1000, "5k")
    with pytest.raises(ValueError, match="protocol must be one of"):
        protocol_folds(10, "2k")


def test_mean_over_folds_and_remap() -> None:
    folds = [{"rsum": 100.0, "i2t_r1": 10.0}, {"rsum": 200.0, "i2t_r1": 30.0}]
    assert mean_metrics(folds) == {"rsum": 150.0, "i2t_r1": 20.0}
    assert remap_to_fold(np.array([7, 5, 7, 6]), np.array([5, 6, 7])).tolist() == [2, 0, 2, 1]


def test_ranking_metrics_precision_and_ndcg_by_hand() -> None:
    from model.metrics import ranking_metrics

    scores = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    relevant = np.array([[True, False, True, False], [True, False, False, False]])
    result = ranking_metrics(scores, relevant, k=2)
    # Query 1: top 2 = items 0 (hit), 1 (miss); query 2: items 3, 2, both misses.
    assert result["p@2"] == pytest.approx((0.5 + 0.0) / 2)
    ideal = 1 + 1 / np.log2(3)
    assert result["ndcg@2"] == pytest.approx((1 / ideal + 0.0) / 2)
    assert result["queries"] == 2


def test_ranking_metrics_break_ties_against_the_query_and_skip_unanswerable() -> None:
    from model.metrics import ranking_metrics

    tied = np.zeros((1, 5))
    relevant = np.array([[False, False, False, False, True]])
    assert ranking_metrics(tied, relevant, k=4)["p@4"] == 0.0  # the relevant item ties last
    none = ranking_metrics(tied, np.zeros((1, 5), dtype=bool), k=4)
    assert none["queries"] == 0
    small = ranking_metrics(np.array([[1.0, 0.0]]), np.array([[True, True]]), k=10)
    assert small["p@10"] == pytest.approx(0.2) and small["ndcg@10"] == pytest.approx(1.0)
