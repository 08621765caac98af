"""Short queries: truth from scene specs, phrasings in the vocabulary, held-out wordings unseen."""

from __future__ import annotations

import random
import re

import pytest

from model.queries import (
    HELD_OUT,
    TRAINED,
    ObjectSpec,
    Query,
    benchmark_queries,
    matches,
    phrase,
    sample_query,
)
from model.scenes import Scene, SceneObject
from model.synthetic import VOCABULARY, SyntheticConfig, generate

RED_CIRCLE_LEFT_OF_BLUE_SQUARE = Scene(
    (
        SceneObject("circle", "red", "small", 0.25, 0.5),
        SceneObject("square", "blue", "large", 0.75, 0.5),
    ),
    "left of",
)
THREE_IN_A_COLUMN = Scene(
    (
        SceneObject("triangle", "red", "large", 0.5, 0.17),
        SceneObject("circle", "green", "small", 0.5, 0.5),
        SceneObject("diamond", "red", "small", 0.5, 0.83),
    ),
    "above",
)


@pytest.mark.parametrize(
    ("query", "scene", "expected"),
    [
        (Query("object", ObjectSpec("red", "circle")), RED_CIRCLE_LEFT_OF_BLUE_SQUARE, True),
        (Query("object", ObjectSpec("blue", "circle")), RED_CIRCLE_LEFT_OF_BLUE_SQUARE, False),
        (
            Query("object", ObjectSpec("red", "circle", "large")),
            RED_CIRCLE_LEFT_OF_BLUE_SQUARE,
            False,
        ),
        (Query("object", ObjectSpec(colour="blue")), RED_CIRCLE_LEFT_OF_BLUE_SQUARE, True),
        (Query("object", ObjectSpec(shape="diamond")), RED_CIRCLE_LEFT_OF_BLUE_SQUARE, False),
        (
            Query("relation", ObjectSpec(shape="circle"), ObjectSpec(shape="square"), "left of"),
            RED_CIRCLE_LEFT_OF_BLUE_SQUARE,
            True,
        ),
        (  # the reverse order is false
            Query("relation", ObjectSpec(shape="square"), ObjectSpec(shape="circle"), "left of"),
            RED_CIRCLE_LEFT_OF_BLUE_SQUARE,
            False,
        ),
        (  # another axis is false
            Query("relation", ObjectSpec(shape="circle"), ObjectSpec(shape="square"), "above"),
            RED_CIRCLE_LEFT_OF_BLUE_SQUARE,
            False,
        ),
        (  # not adjacent: first above third
            Query("relation", ObjectSpec(shape="triangle"), ObjectSpec(shape="diamond"), "above"),
            THREE_IN_A_COLUMN,
            True,
        ),
        (Query("count", count=3), THREE_IN_A_COLUMN, True),
        (Query("count", count=2), THREE_IN_A_COLUMN, False),
        (Query("count", ObjectSpec(colour="red"), count=2), THREE_IN_A_COLUMN, True),
        (Query("count", ObjectSpec(colour="green"), count=2), THREE_IN_A_COLUMN, False),
    ],
)
def test_truth_comes_from_the_scene_spec(query: Query, scene: Scene, expected: bool) -> None:
    assert matches(query, scene) is expected


def test_queries_reject_incomplete_specs() -> None:
    with pytest.raises(ValueError, match="colour, a shape"):
        ObjectSpec(size="small")
    with pytest.raises(ValueError, match="relation query"):
        Query("relation", ObjectSpec(colour="red"))
    with pytest.raises(ValueError, match="count query"):
        Query("count", count=7)
    with pytest.raises(ValueError, match="colour must be"):
        ObjectSpec(colour="teal")


def test_sampled_queries_are_true_of_their_scene_and_round_trip() -> None:
    rng = random.Random(0)
    examples = generate(SyntheticConfig(n_train=0, n_val=0, n_test=300))
    for example in examples:
        for _ in range(5):
            query = sample_query(example.scene, rng)
            assert matches(query, example.scene)
            assert Query.from_dict(query.to_dict()) == query


def test_phrasings_use_only_the_vocabulary_and_proper_articles() -> None:
    rng = random.Random(1)
    vocabulary = set(VOCABULARY)
    for _, query in benchmark_queries() * 4:
        for held_out in (False, True):
            text = phrase(query, rng, held_out=held_out)
            assert set(text.split()) <= vocabulary, text
            assert not re.search(r"\ba [aeiou]", text), text


def test_held_out_phrasings_never_reach_the_training_captions() -> None:
    """Each held-out wording has a mark no trained one has: "picture of", a relation opened
    by "there is" or with no article, a count word last."""
    assert not {t for ts in TRAINED.values() for t in ts} & {
        t for ts in HELD_OUT.values() for t in ts
    }
    count_words = ("one", "two", "three")
    examples = generate(SyntheticConfig(n_train=500, n_val=0, n_test=0))
    partial = [(caption, query) for ex in examples for caption, query in ex.partial]
    assert len(partial) == 1500
    for caption, query in partial:
        assert "picture of" not in caption, caption
        if query.kind == "relation":
            assert caption.startswith(("a ", "an ", "the ")) and not caption.startswith("there"), (
                caption
            )
        if query.kind == "count":
            assert caption.split()[-1] not in count_words, caption
    # And the held-out wordings do carry those marks.
    rng = random.Random(2)
    relation = Query("relation", ObjectSpec(shape="circle"), ObjectSpec(shape="square"), "above")
    count = Query("count", count=2)
    held = {phrase(q, rng, held_out=True) for q in (relation, count) for _ in range(40)}
    assert any(h.startswith("there is") for h in held) and any(h.endswith(" two") for h in held)


def test_benchmark_queries_cover_every_category_and_have_relevant_images() -> None:
    listed = benchmark_queries()
    categories = {category for category, _ in listed}
    assert {"colour+shape", "relation (shapes)", "count"} <= categories
    assert sum(category == "colour+shape" for category, _ in listed) == 32  # 8 colours x 4 shapes
    scenes = [ex.scene for ex in generate(SyntheticConfig(n_train=0, n_val=0, n_test=1000))]
    for category, query in listed:
        relevant = sum(matches(query, scene) for scene in scenes)
        assert 0 < relevant < len(scenes), (category, query)
