"""Embedding shards: a build's progress on disk, so ``--resume`` skips finished work.

The inputs of one modality (in build order, bad files included) are cut into fixed ranges
of ``shard_size`` positions. Shard ``i`` covers positions ``[i·size, (i+1)·size)`` and is two
files in ``<build dir>/shards/<modality>/``:

- ``000012.npy``: float32 ``(n_valid, D)`` embeddings of the range's valid items;
- ``000012.json``: the range, the ids it covers, the positions of the valid items and the
  skipped items with reasons. Written last (temp file + rename, each file and the directory
  fsynced), so its presence, with a ``.npy`` of as many rows as it lists positions, means
  the shard is complete.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.sources import SkippedItem
from model.atomic import fsync_dir, replace_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One range of input positions ``[start, stop)``."""

    index: int
    start: int
    stop: int


@dataclass(frozen=True)
class ShardContent:
    """A finished shard: valid positions ``(n,)`` int64, their vectors ``(n, D)``, skipped items."""

    positions: np.ndarray
    vectors: np.ndarray
    skipped: tuple[SkippedItem, ...]


class ShardStore:
    """The shards of one modality of one build (``ids`` in build order)."""

    def __init__(self, directory: Path, ids: Sequence[str], shard_size: int, dim: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.directory = directory
        self.ids = ids
        self.dim = dim
        self.shards = [
            Shard(i, start, min(start + shard_size, len(ids)))
            for i, start in enumerate(range(0, len(ids), shard_size))
        ]
        directory.mkdir(parents=True, exist_ok=True)

    def _paths(self, shard: Shard) -> tuple[Path, Path]:
        stem = self.directory / f"{shard.index:06d}"
        return stem.with_suffix(".npy"), stem.with_suffix(".json")

    def is_done(self, shard: Shard) -> bool:
        """True when the shard was completely written for these same ids.

        Both files must be there and the vectors must have one row per recorded position:
        a record whose vectors are missing or cut short means the shard is to be redone.
        """
        vectors_path, record_path = self._paths(shard)
        if not (vectors_path.is_file() and record_path.is_file()):
            return False
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            positions = record["positions"]
            shape = np.load(vectors_path, mmap_mode="r").shape  # maps it; reads the header only
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return bool(
            record.get("start") == shard.start
            and record.get("stop") == shard.stop
            and record.get("ids") == list(self.ids[shard.start : shard.stop])
            and isinstance(positions, list)
            and shape == (len(positions), self.dim)
        )

    def pending(self) -> list[Shard]:
        """Shards still to encode."""
        return [shard for shard in self.shards if not self.is_done(shard)]

    def pending_batches(self, batch_size: int) -> list[tuple[Shard, range]]:
        """The pending shards cut into forward batches of at most ``batch_size`` positions, in
        order; a batch never crosses a shard. Every engine cuts the same way, so they pad and
        encode the same batches and give the same vectors."""
        return [
            (shard, range(start, min(start + batch_size, shard.stop)))
            for shard in self.pending()
            for start in range(shard.start, shard.stop, batch_size)
        ]

    def write(
        self,
        shard: Shard,
        positions: Sequence[int],
        vectors: np.ndarray,
        skipped: Sequence[SkippedItem],
    ) -> None:
        """Store a finished shard: vectors first, then the record that marks it complete."""
        if vectors.shape != (len(positions), self.dim) or vectors.dtype != np.float32:
            raise ValueError(
                f"shard {shard.index}: expected float32 vectors of shape "
                f"({len(positions)}, {self.dim}), got {vectors.dtype} {vectors.shape}"
            )
        vectors_path, record_path = self._paths(shard)
        partial = vectors_path.with_name(vectors_path.name + ".part")
        with replace_file(vectors_path, "wb", temporary=partial) as stream:
            np.save(stream, vectors)
        fsync_dir(self.directory)  # the vectors' name is on disk before the record's
        record = {
            "index": shard.index,
            "start": shard.start,
            "stop": shard.stop,
            "ids": list(self.ids[shard.start : shard.stop]),
            "positions": [int(p) for p in positions],
            "skipped": [item.to_dict() for item in skipped],
        }
        partial = record_path.with_name(record_path.name + ".part")
        with replace_file(record_path, temporary=partial) as stream:
            json.dump(record, stream)
        fsync_dir(self.directory)

    def read(self, shard: Shard) -> ShardContent:
        """Load a finished shard."""
        vectors_path, record_path = self._paths(shard)
        record = json.loads(record_path.read_text(encoding="utf-8"))
        vectors = np.load(vectors_path)
        positions = np.asarray(record["positions"], dtype=np.int64)
        if vectors.shape != (len(positions), self.dim):
            raise ValueError(
                f"shard {vectors_path} holds {vectors.shape} vectors for {len(positions)} items"
            )
        skipped = tuple(SkippedItem(**item) for item in record["skipped"])
        return ShardContent(positions, vectors, skipped)

    def layout(self) -> tuple[np.ndarray, tuple[SkippedItem, ...]]:
        """The valid positions ``(n,)`` int64 of all shards in order and their skipped items,
        read from the records only (no vectors). All shards must be done."""
        positions: list[int] = []
        skipped: list[SkippedItem] = []
        for shard in self.shards:
            record = json.loads(self._paths(shard)[1].read_text(encoding="utf-8"))
            positions += record["positions"]
            skipped += [SkippedItem(**item) for item in record["skipped"]]
        return np.asarray(positions, dtype=np.int64), tuple(skipped)

    def vector_blocks(self) -> list[np.ndarray]:
        """The valid rows of every shard in position order: one float32 ``(n_i, D)`` block per
        shard, memory-mapped (``np.load(mmap_mode="r")``), so a finalize step can stream
        them into an index without holding every vector in RAM. All shards must be done."""
        blocks = []
        for shard in self.shards:
            vectors_path, record_path = self._paths(shard)
            record = json.loads(record_path.read_text(encoding="utf-8"))
            vectors = np.load(vectors_path, mmap_mode="r")
            if vectors.shape != (len(record["positions"]), self.dim):
                raise ValueError(
                    f"shard {vectors_path} holds {vectors.shape} vectors for "
                    f"{len(record['positions'])} items"
                )
            blocks.append(vectors)
        return blocks

    def assemble(self) -> ShardContent:
        """All shards in order: valid positions ``(n,)``, vectors ``(n, D)``, skipped items."""
        contents = [self.read(shard) for shard in self.shards]
        total = sum(len(c.positions) for c in contents)
        vectors = np.empty((total, self.dim), dtype=np.float32)
        positions = np.empty(total, dtype=np.int64)
        row = 0
        for content in contents:
            vectors[row : row + len(content.positions)] = content.vectors
            positions[row : row + len(content.positions)] = content.positions
            row += len(content.positions)
        skipped = tuple(item for c in contents for item in c.skipped)
        return ShardContent(positions, vectors, skipped)
