"""Captioned synthetic scenes: a retrieval benchmark that a bag-of-words matcher cannot solve.

Each image shows one to three flat shapes (colour, shape, size, position) on white, each in one
cell of a 4x4 board (:data:`model.scenes.GRID`: at 64 px, one ViLT patch per cell); each of
its captions binds every colour to its shape and states the spatial relation. A share of the
two- and three-object scenes come in *twin groups* of four images whose captions use exactly
the same words: the base scene, its colour-permuted twin (which colour goes with which shape),
its mirrored twin (the relation reversed) and both at once. Only a model that binds attributes
and reads word order tells twins apart; :mod:`model.bow` scores a matcher that cannot.

Training images also get short *partial* captions, the way people search ("a red circle",
"two shapes", "a circle to the left of a square"; :mod:`model.queries`), each stored with the
query it words so that its truth against any scene is known. Val and test keep five full
captions per image: the retrieval protocol is unchanged in form.

:func:`write_dataset` writes PNGs and a Karpathy-style ``dataset.json`` (train / val / test;
the default test split is the COCO-1K protocol, 1,000 images x 5 captions), so the ordinary
readers, trainer and evaluator use it unchanged, plus ``captions.jsonl`` (the test captions)
for the demo index. The output is a pure function of the config, and each split depends only
on the seed and its own size: changing ``n_train`` leaves the test split as it was.

Scenes are rendered upright from their spec, so never train on them with horizontal or
vertical flips: a flip turns an image into its relation twin.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import random
import re
import string
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm import tqdm

from model import queries
from model.atomic import replace_file
from model.scenes import (
    BACKGROUND,
    COLOURS,
    GRID,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
)

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 3  # bump whenever the output for a given config changes
SPLITS = ("train", "val", "test")
IMAGES_DIRNAME = "images"
DATASET_FILENAME = "dataset.json"
CAPTIONS_FILENAME = "captions.jsonl"
GALLERY_FILENAME = "gallery.jsonl"  # the test images: the demo gallery, as an indexer manifest

# Caption words that mean a scene-spec word (the bag-of-words baseline maps them back).
SYNONYMS: dict[str, str] = {
    "little": "small",
    "big": "large",
    "over": "above",
    "under": "below",
    "beneath": "below",
}

_JITTER = 1 / 64  # how far an object strays from its cell's centre: one pixel at 64 px
# The cells a lone object may take for each position word: (columns, rows) of the board.
_MIDDLE = (GRID // 2 - 1, GRID // 2) if GRID % 2 == 0 else (GRID // 2,)
_LONE_CELLS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "left": ((0,), _MIDDLE),
    "right": ((GRID - 1,), _MIDDLE),
    "top": (_MIDDLE, (0,)),
    "bottom": (_MIDDLE, (GRID - 1,)),
    "middle": (_MIDDLE, _MIDDLE),
}
_OBJECT_COUNT_WEIGHTS = (0.2, 0.5, 0.3)  # one, two, three objects (twin groups come on top)
_MAX_SIZE, _MIN_SIZE = 1024, 32

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_POSITION_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "middle": ("in the middle",),
}


@dataclass(frozen=True)
class _AxisPhrases:
    before: tuple[str, ...]  # "A <before> B" where A comes first (left, top)
    after: tuple[str, ...]  # "B <after> A"
    its_after: tuple[str, ...]  # "A with B <its_after>"
    its_before: tuple[str, ...]  # "B with A <its_before>"
    start: str  # "from <start> to <end>"
    end: str
    first_side: str  # "B between A <first_side> and C <last_side>"
    last_side: str


_AXES = {
    "left of": _AxisPhrases(
        ("left of", "to the left of", "on the left of"),
        ("right of", "to the right of", "on the right of"),
        ("to its right", "on its right"),
        ("to its left", "on its left"),
        "left",
        "right",
        "on the left",
        "on the right",
    ),
    "above": _AxisPhrases(
        ("above", "over"),
        ("below", "under", "beneath"),
        ("below it", "under it"),
        ("above it", "over it"),
        "top",
        "bottom",
        "at the top",
        "at the bottom",
    ),
}
# Every template mentions each object exactly once, as "<size> <colour> <shape>".
_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: (
        "a {a} {pos}",
        "there is a {a} {pos}",
        "{pos} there is a {a}",
        "a single {a} {pos}",
        "an image of a {a} {pos}",
        "a {a} {pos} of the picture",
    ),
    2: (
        "a {a} {before} a {b}",
        "a {b} {after} a {a}",
        "there is a {a} {before} a {b}",
        "a {b} is {after} a {a}",
        "a {a} with a {b} {its_after}",
        "a {b} with a {a} {its_before}",
        "{a} {before} {b}",
        "the {a} is {before} the {b}",
        "an image of a {b} {after} a {a}",
    ),
    3: (
        "a {a} {before} a {b} which is {before2} a {c}",
        "a {c} {after} a {b} which is {after2} a {a}",
        "from {start} to {end} a {a} a {b} and a {c}",
        "from {end} to {start} a {c} a {b} and a {a}",
        "a {a} then a {b} then a {c} from {start} to {end}",
        "a {b} between a {a} {first_side} and a {c} {last_side}",
    ),
}
MAX_CAPTIONS_PER_IMAGE = min(len(templates) for templates in _TEMPLATES.values())


def _vocabulary() -> list[str]:
    phrases: list[str] = [*COLOURS, *SHAPES]
    phrases += [word for words in _SIZE_WORDS.values() for word in words]
    phrases += [phrase for options in _POSITION_PHRASES.values() for phrase in options]
    for axis in _AXES.values():
        phrases += [*axis.before, *axis.after, *axis.its_after, *axis.its_before]
        phrases += [axis.start, axis.end, axis.first_side, axis.last_side]
    for templates in _TEMPLATES.values():
        phrases += [re.sub(r"\{\w+\}", " ", template) for template in templates]
    # Short queries (model.queries): their phrasings, nouns, plurals and count words.
    for phrasings in (*queries.TRAINED.values(), *queries.HELD_OUT.values()):
        phrases += [re.sub(r"\{\w+\}", " ", template) for template in phrasings]
    phrases += queries.query_words()
    return sorted({word for phrase in phrases for word in phrase.split()})


# Every word a caption can contain (lower case, no punctuation): the demo tokenizer's words.
VOCABULARY: list[str] = _vocabulary()


@dataclass(frozen=True)
class Example:
    """One image of the dataset: its spec, captions, and the same-split images that are its
    twins (captions with the same attribute words, a different scene)."""

    imgid: int
    split: str
    index: int  # within the split; names the file
    scene: Scene
    captions: tuple[str, ...]
    twin_of: tuple[int, ...] = ()
    # Training images only: short partial captions and the query each one words.
    partial: tuple[tuple[str, queries.Query], ...] = ()

    @property
    def filename(self) -> str:
        return image_filename(self.split, self.index)


def image_filename(split: str, index: int) -> str:
    """The file name of image ``index`` of ``split`` under ``images/``."""
    return f"{split}_{index:06d}.png"


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything the dataset is a function of (stored in ``dataset.json``)."""

    seed: int = 0
    image_size: int = 64  # pixels per side: 4x4 patches of 16 pixels for ViLT
    n_train: int = 20_000
    n_val: int = 500
    n_test: int = 1_000  # the COCO-1K / Flickr-1K protocol
    captions_per_image: int = 5
    hard_fraction: float = 0.5  # share of each split's images that belong to a twin group
    # Extra captions per *training* image, each a short partial description ("a red circle",
    # "two shapes", "a circle left of a square": model.queries, trained phrasings only).
    # Val and test keep exactly ``captions_per_image`` full captions: the retrieval protocol.
    partial_captions: int = 3

    def __post_init__(self) -> None:
        for name in (
            "seed",
            "image_size",
            "n_train",
            "n_val",
            "n_test",
            "captions_per_image",
            "partial_captions",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not _MIN_SIZE <= self.image_size <= _MAX_SIZE:
            raise ValueError(
                f"image_size must be in [{_MIN_SIZE}, {_MAX_SIZE}], got {self.image_size}"
            )
        if not 1 <= self.captions_per_image <= MAX_CAPTIONS_PER_IMAGE:
            raise ValueError(
                f"captions_per_image must be in [1, {MAX_CAPTIONS_PER_IMAGE}], "
                f"got {self.captions_per_image}"
            )
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must be in [0, 1], got {self.hard_fraction!r}")

    def split_sizes(self) -> dict[str, int]:
        """Images per split, in :data:`SPLITS` order (the order of ``imgid``)."""
        return dict(zip(SPLITS, (self.n_train, self.n_val, self.n_test), strict=True))


PRESETS: dict[str, SyntheticConfig] = {
    "tiny": SyntheticConfig(n_train=40, n_val=10, n_test=20),  # tests
    "demo": SyntheticConfig(),  # the demo gallery (test split) and the demo model's data
    "full": SyntheticConfig(),
}


def attribute_words(scene: Scene) -> list[str]:
    """The scene's words with binding and order thrown away: each object's size, colour and
    shape, plus the words of its axis (or its position). Twins have equal lists (sorted)."""
    words = [word for obj in scene.objects for word in (obj.size, obj.colour, obj.shape)]
    if scene.relation == "left of":
        words += ["left", "right"]
    elif scene.relation == "above":
        words += ["above", "below", "top", "bottom"]
    else:
        words.append(str(scene.position))
    return sorted(words)


def render(scene: Scene, image_size: int) -> Image.Image:
    """Draw ``scene`` as an ``image_size`` x ``image_size`` RGB image, without anti-aliasing
    (each object is one flat colour, so its centre pixel has exactly its colour)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy = round(obj.x * image_size), round(obj.y * image_size)
        # Never wider than its cell less a pixel and the most the jitter can move the centre
        # after rounding (1 px at 64, 2 px at 96): no two objects touch at any size.
        shift = int((_JITTER + 0.0005) * image_size + 0.5)
        half = min(round(SIZES[obj.size] * image_size), image_size // (2 * GRID) - 1 - shift)
        half = max(2, half)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
        elif obj.shape == "square":
            side = round(half * 0.85)  # a full-box square looks much bigger than the circle
            draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill)
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill)
    return image


def describe(scene: Scene, rng: random.Random, n_captions: int = 5) -> list[str]:
    """``n_captions`` differently worded captions, each true of ``scene`` and each binding every
    colour to its shape and stating the relation (or the lone object's position)."""
    templates = _TEMPLATES[len(scene.objects)]
    if not 1 <= n_captions <= len(templates):
        raise ValueError(f"n_captions must be in [1, {len(templates)}], got {n_captions}")
    return [_fill(template, scene, rng) for template in rng.sample(templates, n_captions)]


def _fill(template: str, scene: Scene, rng: random.Random) -> str:
    return template.format(**{name: _phrase(name, scene, rng) for name in _fields(template)})


@functools.cache
def _fields(template: str) -> tuple[str, ...]:
    return tuple(name for _, name, _, _ in string.Formatter().parse(template) if name)


def _phrase(field: str, scene: Scene, rng: random.Random) -> str:
    """The words for one template field, synonyms drawn afresh for each caption."""
    if field in ("a", "b", "c"):
        obj = scene.objects["abc".index(field)]
        return f"{rng.choice(_SIZE_WORDS[obj.size])} {obj.colour} {obj.shape}"
    if field == "pos":
        return rng.choice(_POSITION_PHRASES[str(scene.position)])
    options = getattr(_AXES[str(scene.relation)], field.rstrip("2"))  # before2: another draw
    return options if isinstance(options, str) else rng.choice(options)


def _cell_centre(index: int, rng: random.Random) -> float:
    """The centre of the board's column or row ``index``, jittered, as a fraction of the side."""
    return round((index + 0.5) / GRID + rng.uniform(-_JITTER, _JITTER), 3)


def _place_row(rng: random.Random, kinds: list[tuple[str, str, str]], relation: str) -> Scene:
    """Objects (shape, colour, size) in one row (``"left of"``) or column (``"above"``) of the
    board, in cells drawn at random along it, kept in reading order."""
    along = sorted(rng.sample(range(GRID), len(kinds)))
    across = rng.randrange(GRID)
    objects = []
    for cell, (shape, colour, size) in zip(along, kinds, strict=True):
        a, b = _cell_centre(cell, rng), _cell_centre(across, rng)
        x, y = (a, b) if relation == "left of" else (b, a)
        objects.append(SceneObject(shape, colour, size, x, y))
    return Scene(tuple(objects), relation)


def random_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    """One scene drawn like the dataset's non-twin images (``n_objects`` None: 1, 2 or 3 with
    the dataset's weights); for samplers that want fresh scenes rather than the fixed split."""
    if n_objects is None:
        n_objects = rng.choices((1, 2, 3), _OBJECT_COUNT_WEIGHTS)[0]
    if n_objects == 1:
        shape, colour, size = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))
        position = rng.choice(POSITIONS)
        columns, rows = _LONE_CELLS[position]
        x = _cell_centre(rng.choice(columns), rng)
        y = _cell_centre(rng.choice(rows), rng)
        return Scene((SceneObject(shape, colour, size, x, y),), None, position)
    kinds: list[tuple[str, str, str]] = []
    while len(kinds) < n_objects:  # distinct (shape, colour), so "the blue square" is one object
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if all((shape, colour) != kind[:2] for kind in kinds):
            kinds.append((shape, colour, rng.choice(list(SIZES))))
    return _place_row(rng, kinds, rng.choice(RELATIONS))


def _mirror(scene: Scene) -> Scene:
    """The relation twin: the image flipped along the scene's axis (shapes stay upright)."""
    flip_x = scene.relation == "left of"
    objects = tuple(
        replace(obj, x=round(1 - obj.x, 3)) if flip_x else replace(obj, y=round(1 - obj.y, 3))
        for obj in reversed(scene.objects)
    )
    return replace(scene, objects=objects)


def _draw_twin_group(rng: random.Random) -> list[Scene]:
    """A two- or three-object scene with all colours and shapes different, its colour
    permutation (each colour moves to the next object), its mirror image and the mirrored
    permutation: four scenes whose captions share every word."""
    n = rng.choice((2, 2, 3))
    shapes, colours = rng.sample(SHAPES, n), rng.sample(list(COLOURS), n)
    sizes = [rng.choice(list(SIZES)) for _ in range(n)]
    base = _place_row(rng, list(zip(shapes, colours, sizes, strict=True)), rng.choice(RELATIONS))
    rotated = colours[1:] + colours[:1]
    swapped = replace(
        base,
        objects=tuple(
            replace(obj, colour=colour) for obj, colour in zip(base.objects, rotated, strict=True)
        ),
    )
    return [base, swapped, _mirror(base), _mirror(swapped)]


def scene_key(scene: Scene) -> tuple[Any, ...]:
    """What the captions say about a scene (positions within a cell are not said)."""
    kinds = tuple((obj.size, obj.colour, obj.shape) for obj in scene.objects)
    return (scene.relation, scene.position, kinds)


def _generate_split(
    split: str, count: int, config: SyntheticConfig
) -> list[tuple[Scene, list[str], list[tuple[str, queries.Query]]]]:
    # One stream per split, seeded by the split's name: splits do not depend on each other.
    rng = random.Random(f"vldeformer-synthetic/{config.seed}/{split}")
    # In val and test every scene says something different, so each caption has exactly one
    # true image in its split; train may repeat (one-object scenes have only 320 variants).
    unique = split != "train"
    used: set[tuple[Any, ...]] = set()
    scenes: list[Scene] = []
    attempts_left = 100 * count + 1_000

    def accept(candidates: list[Scene]) -> bool:
        nonlocal attempts_left
        attempts_left -= 1
        if attempts_left < 0:
            raise ValueError(
                f"cannot draw {count} different {split} scenes; ask for fewer (n_{split}={count})"
            )
        keys = {scene_key(scene) for scene in candidates}
        if unique and (len(keys) < len(candidates) or keys & used):
            return False
        used.update(keys)
        scenes.extend(candidates)
        return True

    n_groups = int(count * config.hard_fraction) // 4
    groups = 0
    while groups < n_groups:
        groups += accept(_draw_twin_group(rng))
    while len(scenes) < count:
        accept([random_scene(rng)])
    rng.shuffle(scenes)
    drawn = []
    for scene in scenes:
        captions = describe(scene, rng, config.captions_per_image)
        partial: list[tuple[str, queries.Query]] = []
        if split == "train":
            for _ in range(config.partial_captions):
                query = queries.sample_query(scene, rng)
                partial.append((queries.phrase(query, rng), query))
        drawn.append((scene, captions, partial))
    return drawn


def generate(config: SyntheticConfig) -> list[Example]:
    """All examples, train then val then test; ``imgid`` is the position in that list."""
    examples: list[Example] = []
    for split, count in config.split_sizes().items():
        drawn = _generate_split(split, count, config)
        by_words: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for index, (scene, _, _) in enumerate(drawn):
            by_words[tuple(attribute_words(scene))].append(index)
        offset = len(examples)
        for index, (scene, captions, partial) in enumerate(drawn):
            twins = tuple(
                offset + other
                for other in by_words[tuple(attribute_words(scene))]
                if scene_key(drawn[other][0]) != scene_key(scene)
            )
            examples.append(
                Example(offset + index, split, index, scene, tuple(captions), twins, tuple(partial))
            )
    return examples


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    """Write next to ``path``, then rename over it: readers see the old file or the new one."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with replace_file(path, temporary=partial, fsync=False) as file:
        file.writelines(lines)


def gallery_record(example: Example) -> dict[str, Any]:
    """One ``gallery.jsonl`` line: id, path and metadata fields from the scene spec (object
    count, colours, shapes and sizes) that the indexer stores as filterable metadata."""
    objects = example.scene.objects
    return {
        "id": example.filename,
        "path": f"{IMAGES_DIRNAME}/{example.filename}",
        "objects": len(objects),
        "colours": sorted({obj.colour for obj in objects}),
        "shapes": sorted({obj.shape for obj in objects}),
        "sizes": sorted({obj.size for obj in objects}),
    }


def write_gallery_manifest(out_dir: Path, examples: list[Example]) -> None:
    """Write ``gallery.jsonl`` (the test images) atomically, unless it already holds exactly
    these lines. Only this file: a folder written by an earlier generator gets the current
    gallery fields without its images being drawn again."""
    path = Path(out_dir) / GALLERY_FILENAME
    lines = [json.dumps(gallery_record(ex)) + "\n" for ex in examples if ex.split == "test"]
    try:
        if path.read_text(encoding="utf-8") == "".join(lines):
            return
    except (OSError, UnicodeDecodeError):
        pass
    _write_atomic(path, lines)
    logger.info("wrote %s (%d images)", path, len(lines))


def _sentids(examples: list[Example]) -> dict[int, list[int]]:
    """Caption ids per ``imgid``: consecutive over the dataset, full captions before partial."""
    ids: dict[int, list[int]] = {}
    first = 0
    for example in examples:
        count = len(example.captions) + len(example.partial)
        ids[example.imgid] = list(range(first, first + count))
        first += count
    return ids


def _dataset_record(example: Example, sentids: list[int]) -> dict[str, Any]:
    return {
        "filepath": IMAGES_DIRNAME,
        "filename": example.filename,
        "imgid": example.imgid,
        "split": example.split,
        "sentids": sentids,
        "sentences": [
            {"raw": raw, "tokens": raw.split(), "imgid": example.imgid, "sentid": sentid}
            for raw, sentid in zip(example.captions, sentids, strict=False)
        ]
        + [
            {
                "raw": raw,
                "tokens": raw.split(),
                "imgid": example.imgid,
                "sentid": sentid,
                "query": query.to_dict(),
            }
            for (raw, query), sentid in zip(
                example.partial, sentids[len(example.captions) :], strict=True
            )
        ],
        "scene": example.scene.to_dict(),
        "twin_of": list(example.twin_of),
    }


def _read_header(dataset_json: Path) -> dict[str, Any]:
    """The top-level fields of a ``dataset.json`` but its images, from its first line."""
    with dataset_json.open(encoding="utf-8") as file:
        header = json.loads(file.readline() + "]}")
    if not isinstance(header, dict):
        raise ValueError(f"{dataset_json}: expected a JSON object, found {type(header).__name__}")
    return header


def dataset_is_current(out_dir: str | Path, config: SyntheticConfig) -> bool:
    """Whether ``out_dir`` already holds the dataset of ``config`` from this generator version
    (quick: reads the first line of ``dataset.json`` and lists ``images/``)."""
    out_dir = Path(out_dir)
    try:
        header = _read_header(out_dir / DATASET_FILENAME)
        present = set(os.listdir(out_dir / IMAGES_DIRNAME))
    except (OSError, ValueError):
        return False
    wanted = {
        image_filename(split, index)
        for split, count in config.split_sizes().items()
        for index in range(count)
    }
    return (
        header.get("generator_version") == GENERATOR_VERSION
        and header.get("config") == asdict(config)
        and (out_dir / CAPTIONS_FILENAME).is_file()
        and (out_dir / GALLERY_FILENAME).is_file()
        and wanted <= present
    )


def write_dataset(out_dir: str | Path, config: SyntheticConfig, *, force: bool = False) -> Path:
    """Write the dataset of ``config`` into ``out_dir``; return the ``dataset.json`` path.

    Layout: ``images/<split>_<index:06d>.png``, ``dataset.json`` (Karpathy: ``images[]`` with
    ``filepath``, ``filename``, ``imgid``, ``split``, ``sentids``, ``sentences[]`` of ``raw``,
    ``tokens``, ``imgid``, ``sentid``; plus ``scene`` and ``twin_of``; top level ``config`` and
    ``generator_version``), and ``captions.jsonl`` with one ``{"id", "caption", "image"}``
    line per test caption (``image`` relative to ``images/``), and ``gallery.jsonl``, the test
    images as an indexer manifest (``{"id", "path"}`` and metadata fields, the demo gallery:
    :func:`gallery_record`). When the folder already holds this dataset (and not ``force``)
    only ``gallery.jsonl`` is brought up to date. ``dataset.json`` is written last and
    atomically, so its presence means the rest is complete.
    """
    out_dir = Path(out_dir)
    dataset_path = out_dir / DATASET_FILENAME
    if not force and dataset_is_current(out_dir, config):
        logger.info("%s is up to date with %s", dataset_path, config)
        write_gallery_manifest(out_dir, read_examples(dataset_path))
        return dataset_path
    examples = generate(config)
    images_dir = out_dir / IMAGES_DIRNAME
    images_dir.mkdir(parents=True, exist_ok=True)
    dataset_path.unlink(missing_ok=True)  # an interrupted rewrite must not look current
    wanted = {example.filename for example in examples}
    for stale in images_dir.glob("*.png"):  # files of an earlier, larger config
        if re.fullmatch(r"(train|val|test)_\d{6}\.png", stale.name) and stale.name not in wanted:
            stale.unlink()
    for example in tqdm(examples, desc="drawing scenes", unit="image", disable=None):
        image = render(example.scene, config.image_size)
        image.save(images_dir / example.filename, format="PNG", optimize=False)
    sentids = _sentids(examples)
    _write_atomic(
        out_dir / CAPTIONS_FILENAME,
        (
            json.dumps({"id": str(sentid), "caption": raw, "image": ex.filename}) + "\n"
            for ex in examples
            if ex.split == "test"
            for sentid, raw in zip(sentids[ex.imgid], ex.captions, strict=False)
        ),
    )
    write_gallery_manifest(out_dir, examples)
    # One image record a line after a first line with everything else: valid JSON that
    # :func:`dataset_is_current` checks from its first line, and that diffs line by line.
    header = {
        "dataset": "synthetic",
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
    }
    records = [
        json.dumps(_dataset_record(ex, sentids[ex.imgid]), separators=(",", ":")) for ex in examples
    ]
    first_line = json.dumps(header, separators=(",", ":"))[:-1] + ',"images":[\n'
    _write_atomic(dataset_path, [first_line, ",\n".join(records), "\n]}\n"])
    logger.info("wrote %d images to %s", len(examples), out_dir)
    return dataset_path


def read_examples(dataset_json: str | Path) -> list[Example]:
    """The examples of a ``dataset.json`` written by :func:`write_dataset`."""
    path = Path(dataset_json)
    try:
        with path.open(encoding="utf-8") as file:
            records = json.load(file)["images"]
        return [
            Example(
                record["imgid"],
                record["split"],
                int(Path(record["filename"]).stem.rsplit("_", 1)[1]),
                Scene.from_dict(record["scene"]),
                tuple(s["raw"] for s in record["sentences"] if "query" not in s),
                tuple(record["twin_of"]),
                tuple(
                    (s["raw"], queries.Query.from_dict(s["query"]))
                    for s in record["sentences"]
                    if "query" in s
                ),
            )
            for record in records
        ]
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise ValueError(f"{path} is not a synthetic dataset.json: {exc!r}") from exc


def caption_truth(
    examples: list[Example], split: str
) -> tuple[list[Scene], list[int], list[queries.Query | None]]:
    """What each caption of ``split`` is true of, in :func:`model.data.read_pairs` order (image
    by image, full captions then partial ones): ``(scenes, image of each caption, query of
    each caption)``; a full caption has query None and is true of the scenes described alike."""
    scenes: list[Scene] = []
    image_of: list[int] = []
    query_of: list[queries.Query | None] = []
    for example in (ex for ex in examples if ex.split == split):
        for query in [None] * len(example.captions) + [q for _, q in example.partial]:
            image_of.append(len(scenes))
            query_of.append(query)
        scenes.append(example.scene)
    return scenes, image_of, query_of


def is_true_of(query: queries.Query | None, own: Scene, other: Scene) -> bool:
    """Whether a caption of scene ``own`` (``query`` None: a full one) also describes ``other``."""
    if query is None:
        return scene_key(own) == scene_key(other)
    return queries.matches(query, other)


def hard_image_ids(dataset_json: str | Path, split: str = "test") -> set[int]:
    """``imgid`` of the images of ``split`` that have a twin in it: a matcher that ignores
    binding and word order cannot rank their captions' image above the twin's."""
    return {ex.imgid for ex in read_examples(dataset_json) if ex.split == split and ex.twin_of}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.synthetic",
        description="Write the captioned synthetic scenes: images/, dataset.json (Karpathy "
        "splits), captions.jsonl (test captions). Reruns with the same config do nothing.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="demo",
        help="sizes to start from: tiny = 40/10/20 train/val/test images (tests), demo and "
        "full = 20000/500/1000 (default: demo)",
    )
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--n-train", type=int, help="number of training images")
    parser.add_argument("--n-val", type=int, help="number of validation images")
    parser.add_argument("--n-test", type=int, help="number of test images (1000: COCO-1K)")
    parser.add_argument("--image-size", type=int, help="image side in pixels (default 64)")
    parser.add_argument(
        "--hard-fraction", type=float, help="share of images in twin groups (default 0.5)"
    )
    parser.add_argument(
        "--partial-captions",
        type=int,
        help="extra short captions per training image (default 3)",
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI: 0 on success, 1 when the files cannot be written, 2 on bad arguments."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or argparse's own usage error (exit code 2)
        return stop.code if isinstance(stop.code, int) else 2
    overrides = {
        "seed": args.seed,
        "n_train": args.n_train,
        "n_val": args.n_val,
        "n_test": args.n_test,
        "image_size": args.image_size,
        "hard_fraction": args.hard_fraction,
        "partial_captions": args.partial_captions,
    }
    try:
        config = replace(
            PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None}
        )
        if not args.force and dataset_is_current(args.out, config):
            write_gallery_manifest(args.out, read_examples(args.out / DATASET_FILENAME))
            print(f"{args.out / DATASET_FILENAME} is up to date ({args.preset} preset)")
            return 0
        start = time.perf_counter()
        path = write_dataset(args.out, config, force=True)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{parser.prog}: error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    total = config.n_train + config.n_val + config.n_test
    print(
        f"wrote {total} images ({config.n_train} train, {config.n_val} val, {config.n_test} "
        f"test) x {config.captions_per_image} captions in {seconds:.1f} s to {path}"
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
