"""Short queries about synthetic scenes — what a person types into a search box — with their
truth computed from the scene spec, never from captions.

A :class:`Query` names part of a scene: one object by some of its attributes ("a red circle",
"a small blue square", "a red shape", "a circle"), two objects in a relation ("a circle to the
left of a square", "a red shape above a blue triangle"), or a count ("two shapes", "three
red shapes"). :func:`matches` says whether a scene satisfies it; :func:`phrase` words it with a
*trained* phrasing (the ones written into the training split as extra captions) or a
*held-out* one that no training caption uses, to measure generalisation to new wordings.

The same truth serves three users: the training split's partial captions
(:mod:`model.synthetic`), the teacher's mask of false negatives (a partial caption is true of
many images; ``model.itm``), and the query benchmark (``bench/query_bench.py``).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Any

from model.scenes import COLOURS, RELATIONS, SHAPES, SIZES, Scene, SceneObject

KINDS: tuple[str, ...] = ("object", "relation", "count")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
_PLURALS = {shape: f"{shape}s" for shape in SHAPES}
# Caption phrases of a relation read from the first object (left / top) or the second.
_BEFORE = {"left of": ("to the left of", "left of"), "above": ("above", "over")}
_AFTER = {"left of": ("to the right of", "right of"), "above": ("below", "under")}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}


@dataclass(frozen=True)
class ObjectSpec:
    """Some of one object's attributes; None means "any"."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None

    def __post_init__(self) -> None:
        if self.colour is None and self.shape is None:
            raise ValueError("an ObjectSpec names a colour, a shape or both")
        for name, value, allowed in (
            ("colour", self.colour, tuple(COLOURS)),
            ("shape", self.shape, SHAPES),
            ("size", self.size, tuple(SIZES)),
        ):
            if value is not None and value not in allowed:
                raise ValueError(f"ObjectSpec {name} must be one of {allowed}, got {value!r}")

    def holds(self, obj: SceneObject) -> bool:
        return (
            (self.colour is None or obj.colour == self.colour)
            and (self.shape is None or obj.shape == self.shape)
            and (self.size is None or obj.size == self.size)
        )


@dataclass(frozen=True)
class Query:
    """``object``: ``first`` is in the scene. ``relation``: ``first`` is ``relation`` (``left
    of`` / ``above``) ``second``, read in the caption's direction. ``count``: the scene holds
    exactly ``count`` objects (of ``first``'s colour / shape when ``first`` is given)."""

    kind: str
    first: ObjectSpec | None = None
    second: ObjectSpec | None = None
    relation: str | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "object" and self.first is None:
            raise ValueError("an object query needs 'first'")
        if self.kind == "relation" and (
            self.first is None or self.second is None or self.relation not in RELATIONS
        ):
            raise ValueError(f"a relation query needs 'first', 'second' and one of {RELATIONS}")
        if self.kind == "count" and self.count not in COUNT_WORDS:
            raise ValueError(f"a count query needs a count in {sorted(COUNT_WORDS)}")
        if self.kind not in KINDS:
            raise ValueError(f"Query kind must be one of {KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Query:
        specs = {k: ObjectSpec(**data[k]) for k in ("first", "second") if data.get(k) is not None}
        return cls(data["kind"], relation=data.get("relation"), count=data.get("count"), **specs)

    @property
    def colour_and_shape(self) -> bool:
        """An object query that names exactly a colour and a shape ("a red circle")."""
        first = self.first
        return (
            self.kind == "object"
            and first is not None
            and first.colour is not None
            and first.shape is not None
            and first.size is None
        )


def matches(query: Query, scene: Scene) -> bool:
    """Whether ``scene`` satisfies ``query`` (its relevance in the query benchmark)."""
    objects = scene.objects
    if query.kind == "object":
        assert query.first is not None
        return any(query.first.holds(obj) for obj in objects)
    if query.kind == "count":
        counted = [obj for obj in objects if query.first is None or query.first.holds(obj)]
        return len(counted) == query.count
    assert query.first is not None and query.second is not None
    if scene.relation != query.relation:
        return False
    # objects are in reading order along the axis: i before j means "i <relation> j".
    return any(
        query.first.holds(objects[i]) and query.second.holds(objects[j])
        for i in range(len(objects))
        for j in range(i + 1, len(objects))
    )


def _noun(spec: ObjectSpec, rng: random.Random, plural: bool = False) -> str:
    words = []
    if spec.size is not None:
        words.append(rng.choice(_SIZE_WORDS[spec.size]))
    if spec.colour is not None:
        words.append(spec.colour)
    if spec.shape is not None:
        words.append(_PLURALS[spec.shape] if plural else spec.shape)
    else:
        words.append("shapes" if plural else rng.choice(("shape", "object")))
    return " ".join(words)


# Phrasings: "{a}" / "{b}" are object nouns, "{rel}" a relation phrase, "{n}" a count word,
# "{what}" the plural noun counted. Training captions use TRAINED only; HELD_OUT wordings are
# never written into the training split.
TRAINED: dict[str, tuple[str, ...]] = {
    "object": ("a {a}", "the {a}", "there is a {a}", "an image with a {a}"),
    "relation": ("a {a} {rel} a {b}", "the {a} is {rel} the {b}", "a {a} with a {b} {its}"),
    "count": ("{n} {what}", "there are {n} {what}", "an image with {n} {what}"),
}
HELD_OUT: dict[str, tuple[str, ...]] = {
    "object": ("a picture of a {a}", "{a}"),
    "relation": ("there is a {a} {rel} a {b}", "{a} {rel} {b}"),
    "count": ("a picture of {n} {what}", "{what} {n}"),
}
_ITS = {
    ("left of", True): "to its right",
    ("left of", False): "to its left",
    ("above", True): "below it",
    ("above", False): "above it",
}


def phrase(query: Query, rng: random.Random, *, held_out: bool = False) -> str:
    """Word ``query`` with a random trained (or held-out) phrasing."""
    return re.sub(r"\ba (?=[aeiou])", "an ", _phrase(query, rng, held_out))


def _phrase(query: Query, rng: random.Random, held_out: bool) -> str:
    templates = (HELD_OUT if held_out else TRAINED)[query.kind]
    template = rng.choice(templates)
    if query.kind == "count":
        assert query.count is not None
        if query.count == 1:
            noun = _noun(query.first, rng) if query.first else rng.choice(("shape", "object"))
            template = template.replace("there are", "there is")
            return template.format(n="one", what=noun)
        noun = _noun(query.first, rng, plural=True) if query.first else "shapes"
        return template.format(n=COUNT_WORDS[query.count], what=noun)
    assert query.first is not None
    if query.kind == "object":
        return template.format(a=_noun(query.first, rng))
    assert query.second is not None and query.relation is not None
    # Either "first <before> second" or, read the other way, "second <after> first".
    forward = rng.random() < 0.5
    a, b = (query.first, query.second) if forward else (query.second, query.first)
    rel = rng.choice((_BEFORE if forward else _AFTER)[query.relation])
    return template.format(
        a=_noun(a, rng), b=_noun(b, rng), rel=rel, its=_ITS[(query.relation, forward)]
    )


def _partial_spec(obj: SceneObject, rng: random.Random) -> ObjectSpec:
    """Some of ``obj``'s attributes, colour + shape most often (what people type)."""
    named = rng.choices(
        (
            ("colour", "shape"),
            ("size", "colour", "shape"),
            ("colour",),
            ("shape",),
            ("size", "shape"),
        ),
        (0.45, 0.2, 0.15, 0.1, 0.1),
    )[0]
    return ObjectSpec(**{name: getattr(obj, name) for name in named})


def sample_query(scene: Scene, rng: random.Random) -> Query:
    """A random query that ``scene`` satisfies: its training captions' partial descriptions."""
    objects = scene.objects
    kinds = ["object", "object", "count"] + (["relation", "relation"] if len(objects) > 1 else [])
    kind = rng.choice(kinds)
    if kind == "object":
        return Query("object", _partial_spec(rng.choice(objects), rng))
    if kind == "relation":
        i, j = sorted(rng.sample(range(len(objects)), 2))
        first, second = (_partial_spec(objects[k], rng) for k in (i, j))
        return Query("relation", first, second, relation=scene.relation)
    if rng.random() < 0.5:
        return Query("count", count=len(objects))
    obj = rng.choice(objects)
    spec = ObjectSpec(colour=obj.colour) if rng.random() < 0.6 else ObjectSpec(shape=obj.shape)
    count = sum(spec.holds(other) for other in objects)
    return Query("count", spec, count=count)


def benchmark_queries() -> list[tuple[str, Query]]:
    """The query benchmark's fixed set, as ``(category, query)``: every colour+shape pair,
    colour alone, shape alone, size+colour+shape, relations with and without attributes,
    counts. Relevance comes from :func:`matches`; the wording from :func:`phrase`."""
    queries: list[tuple[str, Query]] = []
    for colour in COLOURS:
        for shape in SHAPES:
            queries.append(("colour+shape", Query("object", ObjectSpec(colour, shape))))
    for colour in COLOURS:
        queries.append(("colour", Query("object", ObjectSpec(colour=colour))))
    for shape in SHAPES:
        queries.append(("shape", Query("object", ObjectSpec(shape=shape))))
    for size in SIZES:
        for colour in ("red", "blue", "green", "yellow"):
            for shape in SHAPES:
                queries.append(
                    ("size+colour+shape", Query("object", ObjectSpec(colour, shape, size)))
                )
    for relation in RELATIONS:
        for a in SHAPES:
            for b in SHAPES:
                if a != b:
                    queries.append(
                        (
                            "relation (shapes)",
                            Query("relation", ObjectSpec(shape=a), ObjectSpec(shape=b), relation),
                        )
                    )
        for a, b in (("red", "blue"), ("green", "orange"), ("black", "yellow"), ("pink", "purple")):
            queries.append(
                (
                    "relation (colours)",
                    Query("relation", ObjectSpec(colour=a), ObjectSpec(colour=b), relation),
                )
            )
    for count in (1, 2, 3):
        queries.append(("count", Query("count", count=count)))
    for colour in ("red", "blue", "green", "black"):
        queries.append(("count (colour)", Query("count", ObjectSpec(colour=colour), count=2)))
    return queries


def query_words() -> list[str]:
    """Every word :func:`phrase` can write besides its templates' own (for the tokenizer)."""
    words = [*COLOURS, *SHAPES, *_PLURALS.values(), *COUNT_WORDS.values(), "shape", "shapes"]
    words += ["object", *(w for options in _SIZE_WORDS.values() for w in options)]
    for phrases in (*_BEFORE.values(), *_AFTER.values(), _ITS.values()):
        words += [word for phrase in phrases for word in phrase.split()]
    return words
