"""model.truth: which captions of a batch are true of which of its images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.data import Pair, read_pairs
from model.synthetic import PRESETS, is_true_of, read_examples, write_dataset
from model.truth import TruthTable


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("truth")
    write_dataset(root, PRESETS["tiny"])
    return root / "dataset.json"


def test_truth_table_marks_partial_captions_true_of_other_scenes(
    tiny_world: Path,
) -> None:
    data = tiny_world
    pairs = read_pairs(data, split="train")
    table = TruthTable(pairs, str(data), "train")
    assert table.from_scenes
    everything = list(range(len(pairs)))
    truth = table.batch(everything)
    assert truth.diagonal().all()
    same_image = torch.tensor(
        [[a.image_path == b.image_path for b in pairs] for a in pairs], dtype=torch.bool
    )
    # Partial captions ("a red shape", "two shapes") are true of other images too; full
    # captions of distinct scenes are not.
    assert (truth & ~same_image).any()
    texts = [pair.caption for pair in pairs]
    short = [i for i, text in enumerate(texts) if text in ("two shapes", "there are two shapes")]
    for i in short:
        assert truth[i].sum() > 1


def test_truth_table_without_scene_specs_uses_equal_captions(tmp_path: Path) -> None:
    pairs = [
        Pair(tmp_path / "a.png", "a cat", "a", ""),
        Pair(tmp_path / "b.png", "a cat", "b", ""),
        Pair(tmp_path / "c.png", "a dog", "c", ""),
    ]
    table = TruthTable(pairs, str(tmp_path / "missing.jsonl"), "train")
    assert not table.from_scenes
    assert table.batch([0, 1, 2]).tolist() == [
        [True, True, False],
        [True, True, False],
        [False, False, True],
    ]


def test_truth_table_agrees_with_the_scene_specs_pair_by_pair(tiny_world: Path) -> None:
    # The vectorised table against the definition: is_true_of on every (caption, image) pair.
    pairs = read_pairs(tiny_world, split="train")
    examples = [ex for ex in read_examples(tiny_world) if ex.split == "train"]
    by_path = {ex.filename: ex for ex in examples}
    # Each pair's own text and query, looked up by image and caption text (not by position).
    by_text = {
        (ex.filename, raw): query
        for ex in examples
        for raw, query in [(c, None) for c in ex.captions] + list(ex.partial)
    }
    captions = [
        (by_path[pair.image_path.name].scene, by_text[(pair.image_path.name, pair.caption)])
        for pair in pairs
    ]
    indices = list(range(0, len(pairs), 3))[:60]
    truth = TruthTable(pairs, str(tiny_world), "train").batch(indices)
    for a, i in enumerate(indices):
        own, query = captions[i]
        for b, j in enumerate(indices):
            other = by_path[pairs[j].image_path.name].scene
            expected = a == b or is_true_of(query, own, other)
            assert bool(truth[a, b]) == expected, (pairs[i].caption, pairs[j].image_path.name)
    assert truth.dtype == torch.bool and bool((truth.sum(1) > 1).any())  # some shared truth
