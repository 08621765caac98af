"""Which training captions are true of which training images: the false negatives of a batch.

A contrastive batch treats every other image as a negative of a caption. That is wrong when
the caption is also true of that image: a partial caption ("a red circle", "two shapes") of the
synthetic scenes describes many images, and on real data two images may share an identical
caption. :class:`TruthTable` answers, per batch, which (caption, image) pairs are true, so the
losses (the teacher's in :mod:`model.itm`; the decomposition's
:class:`model.loss.ContrastiveLoss` unless told ``"keep"``) do not push them apart. On the
synthetic scenes the truth comes from the scene specs (:func:`model.synthetic.caption_truth`);
on other data, from identical captions or images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import synthetic
from model.data import Pair


class TruthTable:
    """``batch(indices)[a, b]``: the caption of pair ``indices[a]`` is true of the image of
    pair ``indices[b]`` (the diagonal always)."""

    def __init__(self, pairs: Sequence[Pair], data: str | Path, split: str | None) -> None:
        """``pairs`` as :func:`model.data.read_pairs` read them from ``data``'s ``split``
        (None: several splits or a whole file, whose truth comes from equal captions / images
        only)."""
        self._scenes: list[Any] | None = None
        examples = None if split is None else _synthetic_examples(data)
        if split is None or examples is None:
            # Equal ids mean equal captions / equal image files: the truth without scene specs.
            self._caption_ids = _ids(pair.caption for pair in pairs)
            self._image_ids = _ids(str(pair.image_path) for pair in pairs)
            return
        scenes, image_of, query_of = synthetic.caption_truth(examples, split)
        if len(image_of) != len(pairs):
            raise ValueError(
                f"{data}: {len(pairs)} pairs but {len(image_of)} captioned scenes in {split!r}"
            )
        self._scenes = list(scenes)
        self._image_of = np.asarray(image_of)
        self._query_of = query_of
        # A full caption is true exactly of the scenes described alike (twins are not).
        self._scene_key_ids = _ids(synthetic.scene_key(scene) for scene in scenes)
        self._is_true_of = synthetic.is_true_of

    @property
    def from_scenes(self) -> bool:
        return self._scenes is not None

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """``(B, B)`` bool truth of the batch of pair ``indices``."""
        index = np.asarray(indices, dtype=np.int64)
        if self._scenes is None:
            captions, images = self._caption_ids[index], self._image_ids[index]
            truth = (captions[:, None] == captions[None, :]) | (images[:, None] == images[None, :])
            return torch.from_numpy(truth)
        scene_of = self._image_of[index]
        keys = self._scene_key_ids[scene_of]
        truth = keys[:, None] == keys[None, :]
        for a, i in enumerate(index.tolist()):
            query = self._query_of[i]
            if query is None:
                continue
            own = self._scenes[scene_of[a]]
            truth[a] = [self._is_true_of(query, own, self._scenes[s]) for s in scene_of.tolist()]
            truth[a, a] = True
        return torch.from_numpy(truth)


def _synthetic_examples(data: str | Path) -> list[Any] | None:
    """The synthetic dataset's examples (scene specs), or None for any other caption file."""
    try:
        return synthetic.read_examples(data)
    except (OSError, ValueError):
        return None


def _ids(values: Any) -> np.ndarray:
    """One int per value, equal for equal values."""
    seen: dict[Any, int] = {}
    return np.array([seen.setdefault(value, len(seen)) for value in values], dtype=np.int64)
