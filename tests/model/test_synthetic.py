"""The captioned-scene generator: deterministic, captions true to the scenes, Karpathy layout,
twins a bag-of-words matcher cannot separate, and its CLI."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from model.bow import bag_of_words_similarity, caption_words
from model.data import read_karpathy, read_pairs
from model.queries import benchmark_queries, matches, phrase
from model.synthetic import (
    BACKGROUND,
    COLOURS,
    GRID,
    PRESETS,
    SHAPES,
    VOCABULARY,
    Example,
    Scene,
    SceneObject,
    SyntheticConfig,
    attribute_words,
    caption_truth,
    dataset_is_current,
    generate,
    hard_image_ids,
    is_true_of,
    main,
    read_examples,
    render,
    write_dataset,
)

TINY = PRESETS["tiny"]
# Only a test split: enough scenes to meet every template and twin kind, generated in < 1 s.
MANY_TEST_SCENES = SyntheticConfig(n_train=0, n_val=0, n_test=400)

SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
# Relation words: (axis, True when "P <word> Q" puts P first along the axis).
RELATION_WORDS = {
    "left": ("left of", True),
    "right": ("left of", False),
    "above": ("above", True),
    "over": ("above", True),
    "below": ("above", False),
    "under": ("above", False),
    "beneath": ("above", False),
}
SIDE_WORDS = {"left": ("left of", True), "right": ("left of", False)}
SIDE_WORDS |= {"top": ("above", True), "bottom": ("above", False)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("tiny")
    write_dataset(out_dir, TINY)
    return out_dir


@pytest.fixture(scope="module")
def many_examples() -> list[Example]:
    return generate(MANY_TEST_SCENES)


def _file_bytes(out_dir: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(out_dir)): path.read_bytes()
        for path in sorted(out_dir.rglob("*"))
        if path.is_file()
    }


# --- determinism -------------------------------------------------------------------------


def test_same_seed_writes_byte_identical_files(tiny_dir: Path, tmp_path: Path) -> None:
    write_dataset(tmp_path, TINY)
    first, second = _file_bytes(tiny_dir), _file_bytes(tmp_path)
    assert len(first) == 40 + 10 + 20 + 3  # the PNGs, dataset.json, captions.jsonl, gallery.jsonl
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name


def test_another_seed_writes_other_scenes(tiny_dir: Path, tmp_path: Path) -> None:
    write_dataset(tmp_path, replace(TINY, seed=1))
    first, second = _file_bytes(tiny_dir), _file_bytes(tmp_path)
    assert first["dataset.json"] != second["dataset.json"]
    differing = [name for name in first if name.endswith(".png") and first[name] != second[name]]
    assert len(differing) > 60  # nearly all of the 70 images


def test_each_split_depends_only_on_the_seed_and_its_own_size() -> None:
    def test_scenes_of(config: SyntheticConfig) -> list[tuple[Scene, tuple[str, ...]]]:
        return [(ex.scene, ex.captions) for ex in generate(config) if ex.split == "test"]

    assert test_scenes_of(TINY) == test_scenes_of(replace(TINY, n_train=7, n_val=3))
    assert test_scenes_of(TINY) != test_scenes_of(replace(TINY, seed=5))


# --- captions are true of their scenes ---------------------------------------------------


def _mentioned_objects(tokens: list[str]) -> list[tuple[int, tuple[str, str, str]]]:
    """(token index, (size, colour, shape)) of every '<size> <colour> <shape>' in a caption."""
    return [
        (i, (SIZE_WORDS[tokens[i]], tokens[i + 1], tokens[i + 2]))
        for i in range(len(tokens) - 2)
        if tokens[i] in SIZE_WORDS and tokens[i + 1] in COLOURS and tokens[i + 2] in SHAPES
    ]


def _claimed_layout(caption: str) -> tuple[str | None, str | None, list[tuple[str, str, str]]]:
    """What a caption says, read back independently of the generator's templates:
    (relation, position, objects in order along the relation's axis)."""
    tokens = caption.split()
    mentioned = _mentioned_objects(tokens)
    objects = [kind for _, kind in mentioned]
    if len(objects) == 1:
        positions = [
            word for word in tokens if word in ("left", "right", "top", "bottom", "middle")
        ]
        assert len(positions) == 1, caption
        return None, positions[0], objects
    if len(objects) == 2:
        words = [word for word in tokens if word in RELATION_WORDS]
        assert len(words) == 1, caption
        axis, first_is_subject = RELATION_WORDS[words[0]]
        subject, other = objects
        if "it" in tokens or "its" in tokens:  # "a X with a Y to its right": Y is the subject
            subject, other = other, subject
        return axis, None, [subject, other] if first_is_subject else [other, subject]
    assert len(objects) == 3, caption
    if "from" in tokens:  # "from <start> to <end>": listed in that direction
        at = tokens.index("from")
        axis, forwards = SIDE_WORDS[tokens[at + 1]]
        assert tokens[at + 2] == "to" and SIDE_WORDS[tokens[at + 3]] == (axis, not forwards)
        return axis, None, objects if forwards else objects[::-1]
    if "between" in tokens:  # "a B between a A <side> and a C <side>"
        after_second = tokens[mentioned[1][0] + 3 :]
        side = next(word for word in after_second if word in SIDE_WORDS)
        axis, forwards = SIDE_WORDS[side]
        middle, second, third = objects
        return axis, None, [second, middle, third] if forwards else [third, middle, second]
    assert "which" in tokens, caption  # "a A <rel> a B which is <rel> a C": a chain
    first_words = [w for w in tokens[mentioned[0][0] : mentioned[1][0]] if w in RELATION_WORDS]
    second_words = [w for w in tokens[mentioned[1][0] : mentioned[2][0]] if w in RELATION_WORDS]
    assert len(first_words) == len(second_words) == 1, caption
    (axis, forwards), (second_axis, second_forwards) = (
        RELATION_WORDS[first_words[0]],
        RELATION_WORDS[second_words[0]],
    )
    assert (axis, forwards) == (second_axis, second_forwards), caption
    return axis, None, objects if forwards else objects[::-1]


def test_every_caption_states_its_scene(many_examples: list[Example]) -> None:
    counts = Counter(len(ex.scene.objects) for ex in many_examples)
    assert set(counts) == {1, 2, 3} and counts[2] > counts[1]  # mostly two objects
    for example in many_examples:
        scene = example.scene
        spec = [(obj.size, obj.colour, obj.shape) for obj in scene.objects]
        assert len(example.captions) == 5 and len(set(example.captions)) == 5
        for caption in example.captions:
            assert _claimed_layout(caption) == (scene.relation, scene.position, spec), caption


def test_captions_use_exactly_the_vocabulary(many_examples: list[Example]) -> None:
    assert sorted(set(VOCABULARY)) == VOCABULARY
    assert all(word.isalpha() and word.islower() for word in VOCABULARY)
    assert 30 <= len(VOCABULARY) <= 80
    used = {word for ex in many_examples for caption in ex.captions for word in caption.split()}
    # Training images add partial captions; the query benchmark adds held-out phrasings.
    trained = generate(SyntheticConfig(n_train=1500, n_val=0, n_test=0))
    used |= {word for ex in trained for caption, _ in ex.partial for word in caption.split()}
    rng = random.Random(0)
    for _, query in benchmark_queries() * 8:
        used |= set(phrase(query, rng, held_out=True).split())
    assert used == set(VOCABULARY)  # no word outside it, and none of it unused


def test_scenes_of_the_test_split_are_all_described_differently(
    many_examples: list[Example],
) -> None:
    said = [
        (
            ex.scene.relation,
            ex.scene.position,
            [(o.size, o.colour, o.shape) for o in ex.scene.objects],
        )
        for ex in many_examples
    ]
    assert len({json.dumps(item) for item in said}) == len(said)


def _object_mask(obj: SceneObject, image_size: int) -> np.ndarray:
    alone = render(Scene((obj,), None, "middle"), image_size)
    return (np.asarray(alone) != BACKGROUND).any(axis=2)  # (H, W) bool


@pytest.mark.parametrize("image_size", [64, 32, 96, 100])
def test_rendered_pixels_match_the_scene(many_examples: list[Example], image_size: int) -> None:
    for example in many_examples[:80]:
        scene = example.scene
        pixels = np.asarray(render(scene, image_size))  # (H, W, 3) uint8
        assert pixels.shape == (image_size, image_size, 3)
        drawn_colours = {tuple(rgb) for rgb in np.unique(pixels.reshape(-1, 3), axis=0).tolist()}
        assert drawn_colours == {BACKGROUND} | {COLOURS[obj.colour] for obj in scene.objects}
        masks = [_object_mask(obj, image_size) for obj in scene.objects]
        assert all(mask.any() for mask in masks)
        assert np.sum(masks, axis=0).max() == 1  # no two objects touch the same pixel
        for obj, mask in zip(scene.objects, masks, strict=True):
            centre = pixels[round(obj.y * image_size), round(obj.x * image_size)]
            assert tuple(centre) == COLOURS[obj.colour], (example.imgid, obj)
            assert (pixels[mask] == COLOURS[obj.colour]).all()  # nothing drawn over it
        columns = [np.flatnonzero(mask.any(axis=0)) for mask in masks]
        rows = [np.flatnonzero(mask.any(axis=1)) for mask in masks]
        for i in range(len(masks) - 1):  # each object entirely before the next on the axis
            spans = columns if scene.relation == "left of" else rows
            assert spans[i].max() < spans[i + 1].min(), (example.imgid, scene)
        cell = image_size // GRID
        cells = [
            (int(c.min()) // cell, int(r.min()) // cell) for c, r in zip(columns, rows, strict=True)
        ]
        for (column, row), c, r in zip(cells, columns, rows, strict=True):
            # Inside one cell of the board: at the demo's 64 px, inside one ViLT patch.
            assert c.max() // cell == column and r.max() // cell == row, (example.imgid, scene)
        if scene.position is not None:
            middle = {GRID // 2 - 1, GRID // 2}
            column, row = cells[0]
            assert {
                "left": column == 0 and row in middle,
                "right": column == GRID - 1 and row in middle,
                "top": row == 0 and column in middle,
                "bottom": row == GRID - 1 and column in middle,
                "middle": column in middle and row in middle,
            }[scene.position], scene
        elif scene.relation == "left of":
            assert len({row for _, row in cells}) == 1, scene  # one row of the board
        else:
            assert len({column for column, _ in cells}) == 1, scene


# --- the Karpathy files --------------------------------------------------------------------


def test_dataset_json_has_the_karpathy_layout(tiny_dir: Path) -> None:
    document = json.loads((tiny_dir / "dataset.json").read_text())
    assert document["dataset"] == "synthetic"
    images = document["images"]
    assert Counter(record["split"] for record in images) == {"train": 40, "val": 10, "test": 20}
    assert [record["imgid"] for record in images] == list(range(70))
    sentids = [sentid for record in images for sentid in record["sentids"]]
    assert sentids == list(range(350 + 3 * 40))  # 5 full captions each, 3 partial in train
    for record in images:
        assert record["filepath"] == "images"
        assert (tiny_dir / "images" / record["filename"]).is_file()
        assert record["filename"].startswith(record["split"] + "_")
        assert [s["sentid"] for s in record["sentences"]] == record["sentids"]
        for sentence in record["sentences"]:
            assert sentence["imgid"] == record["imgid"]
            assert sentence["tokens"] == sentence["raw"].split()
        Scene.from_dict(record["scene"])  # a valid spec
    pairs = read_karpathy(tiny_dir / "dataset.json", "test")  # the ordinary reader
    assert len(pairs) == 100 and all(pair.image_path.is_file() for pair in pairs)


def test_captions_jsonl_lists_the_test_captions(tiny_dir: Path) -> None:
    lines = (tiny_dir / "captions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    test_images = [ex for ex in read_examples(tiny_dir / "dataset.json") if ex.split == "test"]
    document = json.loads((tiny_dir / "dataset.json").read_text())
    sentid = {r["imgid"]: r["sentids"] for r in document["images"]}
    expected = [
        (str(sentid[ex.imgid][k]), caption, ex.filename)
        for ex in test_images
        for k, caption in enumerate(ex.captions)
    ]
    assert [(r["id"], r["caption"], r["image"]) for r in records] == expected
    assert all((tiny_dir / "images" / r["image"]).is_file() for r in records)


def test_gallery_manifest_lists_exactly_the_test_images(tiny_dir: Path) -> None:
    """The demo gallery: ids equal the captions' ``image`` links, paths relative to the manifest."""
    records = [json.loads(line) for line in (tiny_dir / "gallery.jsonl").read_text().splitlines()]
    test_images = [ex for ex in read_examples(tiny_dir / "dataset.json") if ex.split == "test"]
    assert [r["id"] for r in records] == [ex.filename for ex in test_images]
    assert all((tiny_dir / r["path"]).is_file() for r in records)


def test_read_examples_gives_back_what_was_generated(tiny_dir: Path) -> None:
    assert read_examples(tiny_dir / "dataset.json") == generate(TINY)


def test_read_examples_rejects_other_json(tmp_path: Path) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": [{"filename": "x.png"}]}))
    with pytest.raises(ValueError, match=r"not a synthetic dataset\.json"):
        read_examples(path)


# --- twins and the bag-of-words baseline ---------------------------------------------------


def _flipped_positions(scene: Scene) -> list[tuple[float, float]]:
    """Object centres, in reading order, of the image flipped along the scene's axis."""
    if scene.relation == "left of":
        return [(1 - obj.x, obj.y) for obj in reversed(scene.objects)]
    return [(obj.x, 1 - obj.y) for obj in reversed(scene.objects)]


def test_twin_groups_swap_colours_and_mirror_the_relation(many_examples: list[Example]) -> None:
    by_id = {ex.imgid: ex for ex in many_examples}
    hard = [ex for ex in many_examples if ex.twin_of]
    assert len(hard) >= 0.4 * len(many_examples)
    colour_swaps = mirrors = 0
    for example in hard:
        for twin in (by_id[i] for i in example.twin_of):
            assert example.imgid in twin.twin_of and twin.scene != example.scene
            assert attribute_words(twin.scene) == attribute_words(example.scene)
            mine, theirs = example.scene.objects, twin.scene.objects
            if [(o.x, o.y, o.shape) for o in mine] == [(o.x, o.y, o.shape) for o in theirs]:
                # Colours permuted among the same shapes: each object's colour changed.
                assert sorted(o.colour for o in mine) == sorted(o.colour for o in theirs)
                assert all(a.colour != b.colour for a, b in zip(mine, theirs, strict=True))
                colour_swaps += 1
            reversed_objects = [(o.colour, o.shape) for o in reversed(theirs)]
            flipped = _flipped_positions(example.scene)
            if [(o.colour, o.shape) for o in mine] == reversed_objects and np.allclose(
                flipped, [(o.x, o.y) for o in theirs], atol=1e-6
            ):  # the image flipped along its axis: the relation reversed
                mirrors += 1
    assert colour_swaps >= len(hard) // 2 and mirrors >= len(hard) // 2
    assert {len(ex.scene.objects) for ex in hard} == {2, 3}  # two- and three-object groups


def test_bag_of_words_cannot_separate_twins(many_examples: list[Example]) -> None:
    captions = [caption for ex in many_examples for caption in ex.captions]
    owner = np.repeat(np.arange(len(many_examples)), 5)
    scores = bag_of_words_similarity(captions, [ex.scene for ex in many_examples])
    assert scores.shape == (len(captions), len(many_examples)) and scores.dtype == np.float32
    own = scores[np.arange(len(captions)), owner]
    # Nearly an oracle: the own image is (tied) first, but for rare scenes whose words are a
    # superset with repeats (cosine of counts favours them).
    assert np.isclose(own, scores.max(axis=1)).mean() > 0.97
    position = {ex.imgid: column for column, ex in enumerate(many_examples)}
    pairs = [(position[ex.imgid], position[t]) for ex in many_examples for t in ex.twin_of]
    assert pairs
    for column, twin_column in pairs:
        np.testing.assert_array_equal(scores[:, column], scores[:, twin_column])
    # Hard captions are never ranked strictly first: their twins tie with them.
    hard = np.isin(owner, [column for column, _ in pairs])
    strictly_first = (scores > own[:, None] - 1e-6).sum(axis=1) == 1
    assert not strictly_first[hard].any() and strictly_first[~hard].mean() > 0.9


def test_caption_words_keeps_attributes_and_maps_synonyms() -> None:
    words = caption_words("a big red circle is under a little blue square")
    assert words == ["large", "red", "circle", "below", "small", "blue", "square"]


def test_hard_image_ids_are_the_test_images_with_twins(tiny_dir: Path) -> None:
    examples = read_examples(tiny_dir / "dataset.json")
    hard = hard_image_ids(tiny_dir / "dataset.json")
    assert hard == {ex.imgid for ex in examples if ex.split == "test" and ex.twin_of}
    assert len(hard) >= 8  # two groups of four out of 20 test images
    assert hard_image_ids(tiny_dir / "dataset.json", "val") <= {
        ex.imgid for ex in examples if ex.split == "val"
    }


# --- configuration, rewriting and the CLI -------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_test", -1), ("image_size", 8), ("captions_per_image", 7), ("hard_fraction", 1.5)],
)
def test_config_rejects_bad_values(field: str, value: float) -> None:
    changes: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field) as error:
        replace(TINY, **changes)
    assert str(value) in str(error.value)


def test_scene_rejects_inconsistent_specs() -> None:
    obj = SceneObject("circle", "red", "small", 0.5, 0.5)
    with pytest.raises(ValueError, match="'hexagon'"):
        SceneObject("hexagon", "red", "small", 0.5, 0.5)
    with pytest.raises(ValueError, match="position"):
        Scene((obj,), "left of")
    with pytest.raises(ValueError, match="relation"):
        Scene((obj, obj), None)
    right = replace(obj, x=0.8, colour="blue")
    Scene((obj, right), "left of")
    with pytest.raises(
        ValueError, match=r"reading order along 'left of', got centres \[0\.8, 0\.5\]"
    ):
        Scene((right, obj), "left of")


def test_rewrite_is_skipped_when_current_and_drops_stale_images(tmp_path: Path) -> None:
    write_dataset(tmp_path, TINY)
    dataset = tmp_path / "dataset.json"
    stamp = dataset.stat().st_mtime_ns
    os.utime(dataset, ns=(stamp - 10**9, stamp - 10**9))
    assert dataset_is_current(tmp_path, TINY)
    write_dataset(tmp_path, TINY)
    assert dataset.stat().st_mtime_ns == stamp - 10**9  # not rewritten
    (tmp_path / "images" / "test_000003.png").unlink()
    assert not dataset_is_current(tmp_path, TINY)
    smaller = replace(TINY, n_train=30)
    write_dataset(tmp_path, smaller)
    assert dataset_is_current(tmp_path, smaller) and not dataset_is_current(tmp_path, TINY)
    names = {path.name for path in (tmp_path / "images").iterdir()}
    assert len(names) == 60 and "train_000039.png" not in names and "test_000003.png" in names
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_cli_writes_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "demo"
    argv = ["--out", str(out_dir), "--preset", "tiny", "--n-test", "12", "--seed", "3"]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "12 test" in summary and str(out_dir) in summary
    examples = read_examples(out_dir / "dataset.json")
    assert Counter(ex.split for ex in examples) == {"train": 40, "val": 10, "test": 12}
    assert len((out_dir / "captions.jsonl").read_text().splitlines()) == 60
    with Image.open(out_dir / "images" / "test_000000.png") as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    assert main(argv) == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--out"),
        (["--preset", "huge"], "huge"),
        (["--n-test", "-5"], "-5"),
        (["--n-train", "many"], "many"),
        (["--image-size", "8"], "image_size"),
        (["--hard-fraction", "2"], "2.0"),
    ],
)
def test_cli_rejects_bad_arguments(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = [] if not argv else ["--out", str(tmp_path / "out")]
    assert main(out + argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_cli_help_explains_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--out", "--preset", "--seed", "--n-train", "--n-val", "--n-test"):
        assert option in text
    assert "--image-size" in text and "--force" in text


# --- partial captions --------------------------------------------------------------------


def test_only_training_images_get_partial_captions_and_each_is_true_of_its_scene() -> None:
    examples = generate(SyntheticConfig(n_train=300, n_val=20, n_test=50))
    for example in examples:
        assert len(example.captions) == 5
        if example.split != "train":
            assert example.partial == ()
            continue
        assert len(example.partial) == 3
        for caption, query in example.partial:
            assert matches(query, example.scene), (caption, query, example.scene)
    kinds = Counter(q.kind for ex in examples for _, q in ex.partial)
    assert set(kinds) == {"object", "relation", "count"}


def test_partial_captions_round_trip_and_align_with_read_pairs(tiny_dir: Path) -> None:
    examples = read_examples(tiny_dir / "dataset.json")
    assert examples == generate(TINY)
    scenes, image_of, query_of = caption_truth(examples, "train")
    pairs = read_pairs(tiny_dir / "dataset.json", split="train")
    train = [ex for ex in examples if ex.split == "train"]
    expected = [c for ex in train for c in (*ex.captions, *(raw for raw, _ in ex.partial))]
    assert [pair.caption for pair in pairs] == expected
    assert len(image_of) == len(query_of) == len(pairs) and len(scenes) == len(train)
    for pair, image, query in zip(pairs, image_of, query_of, strict=True):
        assert pair.image_path.name == train[image].filename
        assert is_true_of(query, scenes[image], scenes[image])
    # The test split stays the 5-caption protocol.
    assert len(read_pairs(tiny_dir / "dataset.json", split="test")) == 5 * TINY.n_test


def test_a_full_caption_is_true_only_of_a_scene_described_the_same() -> None:
    examples = generate(MANY_TEST_SCENES)
    a, b = examples[0].scene, examples[1].scene
    assert is_true_of(None, a, a) and not is_true_of(None, a, b)
