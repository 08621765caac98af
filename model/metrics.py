"""Cross-modal retrieval metrics: Recall@K in both directions and RSUM.

The standard protocol of image-text retrieval (Karpathy splits of COCO and Flickr30k):
every test image has several captions (5); an **image query** (image→text) is correct at K
when *any* of its captions is among the K best-scored captions, a **caption query**
(text→image) when its one image is among the K best-scored images. Recalls are percentages,
RSUM is the sum of the six recalls (i2t and t2i at 1, 5, 10), the mean recall their mean.

Ties are broken **against the query** (pessimistic, and independent of item order): the rank
of a query's answer is the number of *negatives* scoring greater than *or equal to* its best
positive. A model that gives every item the same score therefore gets recall 0, never the
recall of whatever order the items happened to be stored in; positives tied with each other
do not hurt.

Protocols (:func:`protocol_folds`): ``1k`` — the first 1,000 test images (Flickr30k 1K), or,
with 5,000 or more, the mean over the five folds of 1,000 (COCO 1K); ``5k`` — the first 5,000
images (COCO 5K); ``full`` — all images given.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

Protocol = Literal["1k", "5k", "full"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
RECALL_AT: tuple[int, ...] = (1, 5, 10)
# The keys of a metrics dict, in the order reports print them.
METRIC_KEYS: tuple[str, ...] = (
    *(f"i2t_r{k}" for k in RECALL_AT),
    *(f"t2i_r{k}" for k in RECALL_AT),
    "rsum",
    "mean_recall",
)
_FOLD_SIZE = 1000
_COCO_5K = 5000


def check_caption_to_image(caption_to_image: np.ndarray, n_images: int) -> np.ndarray:
    """Validate the caption→image mapping: int ``(n_captions,)`` with values in ``[0, n_images)``.

    Every image must have at least one caption (an image query without a positive has no
    defined recall). Returns the mapping as int64.
    """
    mapping = np.asarray(caption_to_image)
    if mapping.ndim != 1 or not np.issubdtype(mapping.dtype, np.integer):
        raise ValueError(
            "caption_to_image must be a 1-D integer array (n_captions,), got "
            f"shape {mapping.shape} dtype {mapping.dtype}"
        )
    if mapping.size and (mapping.min() < 0 or mapping.max() >= n_images):
        raise ValueError(
            f"caption_to_image values must lie in [0, {n_images}), "
            f"found [{mapping.min()}, {mapping.max()}]"
        )
    without_caption = np.setdiff1d(np.arange(n_images), mapping)
    if without_caption.size:
        raise ValueError(
            f"{without_caption.size} image(s) have no caption, e.g. image {without_caption[0]}"
        )
    return mapping.astype(np.int64, copy=False)


def _check_scores(scores: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    array = np.asarray(scores)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN scores ({int(np.isnan(array).sum())} of them)")
    return array


def image_to_text_ranks(sim_i2t: np.ndarray, caption_to_image: np.ndarray) -> np.ndarray:
    """0-based rank of each image query's best caption: ``(n_images,)`` int64.

    ``sim_i2t[i, c]`` is the score of caption ``c`` for image query ``i``. The rank is the
    number of *other images'* captions scoring ``>=`` the best of image ``i``'s captions.
    """
    n_images = np.asarray(sim_i2t).shape[0]
    mapping = check_caption_to_image(caption_to_image, n_images)
    scores = _check_scores(sim_i2t, (n_images, mapping.size), "sim_i2t")
    captions = np.arange(mapping.size)
    positive_score = scores[mapping, captions]  # (n_captions,) each caption's score for its image
    best_positive = np.full(n_images, -np.inf, dtype=np.float64)
    np.maximum.at(best_positive, mapping, positive_score)  # (n_images,)
    at_least_best = (scores >= best_positive[:, None]).sum(axis=1)  # positives included
    positives_at_best = np.bincount(
        mapping, weights=positive_score >= best_positive[mapping], minlength=n_images
    )
    return (at_least_best - positives_at_best.astype(np.int64)).astype(np.int64)


def text_to_image_ranks(sim_t2i: np.ndarray, caption_to_image: np.ndarray) -> np.ndarray:
    """0-based rank of each caption query's image: ``(n_captions,)`` int64.

    ``sim_t2i[c, i]`` is the score of image ``i`` for caption query ``c``. The rank is the
    number of other images scoring ``>=`` the caption's own image.
    """
    scores = np.asarray(sim_t2i)
    if scores.ndim != 2:
        raise ValueError(f"sim_t2i must be 2-D (n_captions, n_images), got shape {scores.shape}")
    mapping = check_caption_to_image(caption_to_image, scores.shape[1])
    scores = _check_scores(scores, (mapping.size, scores.shape[1]), "sim_t2i")
    positive_score = scores[np.arange(mapping.size), mapping]  # (n_captions,)
    # Every row counts its own image once (x >= x), hence the - 1.
    return ((scores >= positive_score[:, None]).sum(axis=1) - 1).astype(np.int64)


def recall_from_ranks(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose 0-based rank is below ``k``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no queries: cannot compute a recall over 0 ranks")
    return float(100.0 * np.mean(ranks < k))


def retrieval_metrics(
    sim_i2t: np.ndarray, caption_to_image: np.ndarray, sim_t2i: np.ndarray | None = None
) -> dict[str, float]:
    """Recall@1/5/10 in both directions, RSUM and mean recall (all in percent).

    Args:
        sim_i2t: ``(n_images, n_captions)`` scores, higher = better match.
        caption_to_image: ``(n_captions,)`` int, the image index of each caption.
        sim_t2i: ``(n_captions, n_images)`` scores for the caption queries; defaults to
            ``sim_i2t.T``. Separate only when the ranking depends on the direction (re-ranked
            candidate lists).

    Returns:
        ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "mean_recall"}``.
    """
    sim_i2t = np.asarray(sim_i2t)
    if sim_i2t.ndim != 2:
        raise ValueError(f"sim_i2t must be 2-D (n_images, n_captions), got shape {sim_i2t.shape}")
    i2t = image_to_text_ranks(sim_i2t, caption_to_image)
    t2i = text_to_image_ranks(sim_i2t.T if sim_t2i is None else sim_t2i, caption_to_image)
    metrics = {f"i2t_r{k}": recall_from_ranks(i2t, k) for k in RECALL_AT}
    metrics.update({f"t2i_r{k}": recall_from_ranks(t2i, k) for k in RECALL_AT})
    recalls = [metrics[key] for key in METRIC_KEYS[: 2 * len(RECALL_AT)]]
    metrics["rsum"] = float(sum(recalls))
    metrics["mean_recall"] = float(np.mean(recalls))
    return metrics


def mean_metrics(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of several metrics dicts (COCO 1K: the mean over its 5 folds)."""
    if not per_fold:
        raise ValueError("mean_metrics needs at least one metrics dict")
    return {key: float(np.mean([fold[key] for fold in per_fold])) for key in per_fold[0]}


def protocol_folds(n_images: int, protocol: str) -> list[np.ndarray]:
    """Image indices of each evaluation fold of ``protocol`` over ``n_images`` test images.

    ``1k``: 5 folds of 1,000 when there are at least 5,000 images (COCO 1K), else the first
    1,000 (Flickr30k 1K); ``5k``: the first 5,000; ``full``: every image. A protocol that needs
    more images than there are raises ``ValueError`` (use ``full`` for a subset).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if n_images < 1:
        raise ValueError(f"no test images to evaluate (n_images={n_images})")
    if protocol == "full":
        return [np.arange(n_images)]
    needed = _FOLD_SIZE if protocol == "1k" else _COCO_5K
    if n_images < needed:
        raise ValueError(
            f"protocol {protocol!r} needs at least {needed} test images, found {n_images}; "
            "use protocol 'full' to evaluate all of them"
        )
    if protocol == "5k":
        return [np.arange(_COCO_5K)]
    n_folds = 5 if n_images >= _COCO_5K else 1
    return [np.arange(fold * _FOLD_SIZE, (fold + 1) * _FOLD_SIZE) for fold in range(n_folds)]


def fold_captions(caption_to_image: np.ndarray, image_indices: np.ndarray) -> np.ndarray:
    """Indices of the captions whose image is in ``image_indices`` (in caption order)."""
    return np.flatnonzero(np.isin(caption_to_image, image_indices))


def remap_to_fold(caption_to_image: np.ndarray, image_indices: np.ndarray) -> np.ndarray:
    """The fold's own caption→image mapping: positions within ``image_indices``.

    ``caption_to_image`` here holds global image indices of captions that are all in the fold.
    """
    lookup = np.full(int(np.max(image_indices)) + 1, -1, dtype=np.int64)
    lookup[image_indices] = np.arange(len(image_indices))
    remapped = lookup[caption_to_image]
    if (remapped < 0).any():
        raise ValueError("caption_to_image holds images outside the fold")
    return remapped


def ranking_metrics(scores: np.ndarray, relevant: np.ndarray, k: int = 10) -> dict[str, float]:
    """Precision@k and nDCG@k (binary relevance) of each query's top ``k``, averaged.

    ``scores`` ``(n_queries, n_items)``; ``relevant`` bool, same shape. Ties are broken
    against the query, as everywhere here: among equal scores, non-relevant items come first.
    nDCG's ideal ranking puts ``min(k, relevant items)`` relevant items first; a query with no
    relevant item is skipped (it has no ideal).
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if scores.shape != relevant.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} must match (2-D)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    keep = relevant.any(axis=1)
    scores, relevant = scores[keep], relevant[keep]
    if not len(scores):
        return {f"p@{k}": float("nan"), f"ndcg@{k}": float("nan"), "queries": 0}
    name, k = k, min(k, scores.shape[1])  # a gallery smaller than k: its whole length
    # Sort by score descending, then relevant last among ties (pessimistic).
    order = np.lexsort((relevant, -scores), axis=1)[:, :k]
    hits = np.take_along_axis(relevant, order, axis=1).astype(np.float64)  # (q, k)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = hits @ discount
    ideal = np.array([discount[: min(k, int(n))].sum() for n in relevant.sum(axis=1)])
    return {
        f"p@{name}": float(hits.sum(axis=1).mean() / name),
        f"ndcg@{name}": float((dcg / ideal).mean()),
        "queries": len(scores),
    }
