"""Bag-of-words baseline for the synthetic benchmark: what a matcher that ignores binding and
word order can do at best.

Each image is represented by the attribute words of its scene spec (an oracle "perfect object
detector": every object's size, colour and shape, and the words of the scene's axis or
position), each caption by its attribute words with synonyms mapped to the spec's words; the
score is the cosine of the two word-count vectors. It ranks a caption's own image first
(possibly tied), except that it cannot separate an image from its twins (colour-swapped or
relation-swapped): their word bags are equal, so every caption scores them equally.
"""

from __future__ import annotations

import numpy as np

from model.synthetic import COLOURS, SHAPES, SIZES, SYNONYMS, Scene, attribute_words

SPATIAL_WORDS: tuple[str, ...] = ("left", "right", "above", "below", "top", "bottom", "middle")
# The words both sides are counted over; function words ("a", "of", "is") carry nothing.
ATTRIBUTE_VOCABULARY: list[str] = sorted({*COLOURS, *SHAPES, *SIZES, *SPATIAL_WORDS})
_SINGULAR = {f"{shape}s": shape for shape in SHAPES}
_COLUMN = {word: column for column, word in enumerate(ATTRIBUTE_VOCABULARY)}


def caption_words(caption: str) -> list[str]:
    """The attribute words of a caption, in order, synonyms mapped (``"big"`` -> ``"large"``)."""
    words = (_SINGULAR.get(word, word) for word in caption.lower().split())
    words = (SYNONYMS.get(word, word) for word in words)
    return [word for word in words if word in _COLUMN]


def _unit_counts(bags: list[list[str]]) -> np.ndarray:
    counts = np.zeros((len(bags), len(ATTRIBUTE_VOCABULARY)), dtype=np.float32)
    for row, words in enumerate(bags):
        for word in words:
            counts[row, _COLUMN[word]] += 1.0
    norms = np.linalg.norm(counts, axis=1, keepdims=True)
    return counts / np.maximum(norms, 1e-12)


def bag_of_words_similarity(captions: list[str], scenes: list[Scene]) -> np.ndarray:
    """Cosine similarity of word-count vectors, float32 ``(n_captions, n_images)``.

    A caption without attribute words scores 0 against every image.
    """
    caption_vectors = _unit_counts([caption_words(caption) for caption in captions])
    image_vectors = _unit_counts([attribute_words(scene) for scene in scenes])
    # Score each distinct bag once: images with equal bags then get bit-identical columns,
    # which a BLAS product over all columns does not promise.
    bags, bag_of_image = np.unique(image_vectors, axis=0, return_inverse=True)
    return (caption_vectors @ bags.T)[:, bag_of_image.reshape(-1)]  # (N_captions, N_images)
