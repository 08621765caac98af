"""Pipeline pieces without a full build: decoding results, picklability, shards, progress."""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from indexer.pipeline import ImageDecodeDataset, collate_decoded
from indexer.progress import Progress
from indexer.shards import ShardStore
from indexer.sources import SkippedItem
from model.backbone import load_image_processor
from tests.indexer.gallery import GallerySpec


def test_decoding_classifies_files_and_survives_pickling(
    gallery: GallerySpec, tiny_vilt_dir: Path
) -> None:
    names = [*gallery.good[:3], "bomb.png", "dangling.jpg", "drawing.svg"]
    dataset = ImageDecodeDataset(
        [str(gallery.folder / n) for n in names], load_image_processor(tiny_vilt_dir)
    )
    # Worker processes receive the dataset pickled (any start method, spawn included).
    dataset = pickle.loads(pickle.dumps(dataset))
    items = [dataset[i] for i in range(len(dataset))]
    assert [item.reason for item in items] == [None, None, None, "too_many_pixels", "missing_file",
                                               "unsupported_format"]  # fmt: skip
    batch = collate_decoded(items)
    assert batch.positions == [0, 1, 2]
    assert batch.pixel_values is not None and batch.pixel_values.shape[:2] == (3, 3)
    assert batch.pixel_mask is not None and batch.pixel_mask.shape[0] == 3
    assert [f.position for f in batch.failures] == [3, 4, 5]
    assert collate_decoded(items[3:]).pixel_values is None


def test_shards_round_trip_and_know_when_they_are_done(tmp_path: Path) -> None:
    ids = [f"id{i}" for i in range(10)]
    store = ShardStore(tmp_path / "shards", ids, shard_size=4, dim=3)
    assert [(s.start, s.stop) for s in store.shards] == [(0, 4), (4, 8), (8, 10)]
    vectors = np.arange(9, dtype=np.float32).reshape(3, 3)
    skipped = [SkippedItem("images", "id2", "/x/id2", "corrupt_image", "truncated")]
    store.write(store.shards[0], [0, 1, 3], vectors, skipped)
    assert store.pending() == store.shards[1:]
    content = store.read(store.shards[0])
    np.testing.assert_array_equal(content.vectors, vectors)
    assert content.positions.tolist() == [0, 1, 3] and content.skipped == tuple(skipped)
    # Different inputs in the same range: the shard no longer counts as done.
    assert ShardStore(tmp_path / "shards", ["other", *ids[1:]], 4, 3).pending()[0].index == 0
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        store.write(store.shards[1], [4, 5], vectors, [])


def test_progress_logs_rate_and_eta_without_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="indexer.progress")
    progress = Progress(100, "images", initial=20, interval_s=0.0, stream=io.StringIO())
    progress.update(30)
    progress.close()
    assert "images: 50/100 (50%)" in caplog.text and "items/s, ETA" in caplog.text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_on_a_terminal() -> None:
    stream = _Terminal()
    progress = Progress(10, "captions", stream=stream)
    progress.update(10)
    progress.close()
    assert "captions" in stream.getvalue() and "10/10" in stream.getvalue()


def test_vector_blocks_are_the_valid_rows_of_each_shard_memory_mapped(tmp_path: Path) -> None:

    store = ShardStore(tmp_path / "shards", ["a", "b", "c", "d", "e"], shard_size=2, dim=3)
    rng = np.random.default_rng(0)
    written = []
    for shard in store.shards:
        positions = [p for p in range(shard.start, shard.stop) if p != 1]  # "b" was unusable
        vectors = rng.random((len(positions), 3), dtype=np.float32)
        skipped = (
            [SkippedItem("images", "b", "b.png", "corrupt_image", "")] if shard.index == 0 else []
        )
        store.write(shard, positions, vectors, skipped)
        written.append(vectors)
    blocks = store.vector_blocks()
    assert [b.shape for b in blocks] == [(1, 3), (2, 3), (1, 3)]
    assert all(isinstance(b, np.memmap) for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), store.assemble().vectors)
    positions, skipped = store.layout()
    assert positions.tolist() == [0, 2, 3, 4] and [s.id for s in skipped] == ["b"]
