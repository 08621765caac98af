"""IVF-PQ indexes whose inverted lists live on disk, built from vectors given in blocks.

The FAISS ``contrib/ondisk.py`` (and autofaiss) scheme, so that the vectors never sit in RAM
at once and the served index holds only its coarse centroids and PQ tables in memory:

1. **train** one IVF-PQ (spherical k-means coarse quantizer + product quantizer) on a sample
   of ``train_points_per_list · nlist`` rows gathered from the blocks;
2. **fill** one copy of the trained, empty index per :attr:`IndexPolicy.ondisk_fill_vectors`
   rows, in row order with ids = global row numbers, and write each to a scratch file. The
   input is read in chunks of 64K rows on a reader thread while faiss encodes the previous
   chunk (faiss already spreads one ``add`` over every core, so block-level parallelism
   would only oversubscribe them);
3. **merge** their inverted lists into one ``OnDiskInvertedLists`` file next to the index
   (``images.faiss`` + ``images.ivfdata``) with ``faiss.contrib.ondisk.merge_ondisk``.

The index file records the ivfdata file by its *base name* only, and is read with
:data:`READ_FLAGS`: ``IO_FLAG_ONDISK_SAME_DIR`` looks for it next to the index file, so the
version directory can be renamed (staging -> ``versions/<v>``) after it was written, and
``IO_FLAG_READ_ONLY`` maps it read-only. ``IO_FLAG_MMAP`` is *not* used: on faiss-cpu 1.15.1
searching an on-disk IVF-PQ read with it segfaults (tests/indexer/test_ondisk.py pins this).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from indexer.faiss_index import (
    RECALL_K,
    BuiltIndex,
    IndexPolicy,
    ivf_nlist,
    pq_layout,
    tune_index,
    tuning_queries,
)

logger = logging.getLogger(__name__)

IVFDATA_SUFFIX = ".ivfdata"
# How an on-disk index is read: its ivfdata next to it, mapped read-only. Never IO_FLAG_MMAP.
READ_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
_CHUNK_ROWS = 65_536  # rows per add() / knn() call: bounded temporary memory


class VectorBlocks:
    """A collection of float32 ``(n, d)`` vectors given as blocks in row order.

    Each block is a 2-d float32 array (a read-only ``np.memmap`` is fine); none is copied
    whole: rows are read in chunks (:meth:`chunks`) or gathered (:meth:`take`).
    """

    def __init__(self, blocks: np.ndarray | Sequence[np.ndarray], name: str = "vectors") -> None:
        # Blocks are looked up by position when read, never held in a list: a sequence may
        # make each block on demand (a memmap, a generator of benchmark vectors).
        self._blocks: Sequence[np.ndarray] = [blocks] if isinstance(blocks, np.ndarray) else blocks
        self.name = name
        lengths, dims = [], set()
        for position in range(len(self._blocks)):
            block = self._blocks[position]
            if not isinstance(block, np.ndarray) or block.dtype != np.float32 or block.ndim != 2:
                raise ValueError(
                    f"{name}: block {position} must be a float32 (rows, d) array, got "
                    f"{type(block).__name__} {getattr(block, 'dtype', None)} "
                    f"{getattr(block, 'shape', None)}"
                )
            lengths.append(len(block))
            dims.add(block.shape[1])
        if len(dims) > 1:
            raise ValueError(f"{name}: blocks of several dimensions {sorted(dims)}")
        self.d: int = dims.pop() if dims else 0
        self.starts = np.cumsum([0, *lengths])  # (nblocks + 1,) first row of each block

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.d

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        """Rows by global number (for :func:`indexer.faiss_index.tuning_queries`)."""
        return self.take(rows)

    def take(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """The given global rows, float32 ``(len(rows), d)`` in the order given."""
        wanted = np.asarray(rows, dtype=np.int64)
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= len(self)):
            raise ValueError(f"{self.name}: rows must be in 0..{len(self) - 1}")
        out = np.empty((len(wanted), self.d), dtype=np.float32)
        owner = np.searchsorted(self.starts, wanted, side="right") - 1
        for position in np.unique(owner):
            mine = np.flatnonzero(owner == position)
            local = wanted[mine] - self.starts[position]
            order = np.argsort(local, kind="stable")  # sorted reads suit a memmap
            out[mine[order]] = self._blocks[int(position)][local[order]]
        return out

    def chunks(self, rows: int = _CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, chunk)`` pairs covering every row in order; chunks are C-contiguous
        float32 copies of at most ``rows`` rows, read one ahead on a thread."""

        def read() -> Iterator[tuple[int, np.ndarray]]:
            for position in range(len(self._blocks)):
                start, stop = int(self.starts[position]), int(self.starts[position + 1])
                if stop == start:
                    continue
                block = self._blocks[position]
                for offset in range(0, stop - start, rows):
                    piece = np.array(block[offset : offset + rows], dtype=np.float32, order="C")
                    yield int(start) + offset, piece

        reader = read()
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(next, reader, None)
            while (item := pending.result()) is not None:
                pending = pool.submit(next, reader, None)
                yield item

    def concatenate(self) -> np.ndarray:
        """All rows as one C-contiguous float32 ``(n, d)`` array (for in-memory indexes)."""
        if len(self._blocks) == 1 and self._blocks[0].flags.c_contiguous:
            return np.asarray(self._blocks[0])
        out = np.empty(self.shape, dtype=np.float32)
        for start, chunk in self.chunks():
            out[start : start + len(chunk)] = chunk
        return out


def ivfdata_path(index_path: Path) -> Path:
    """The inverted-lists file of an on-disk index: ``images.faiss`` -> ``images.ivfdata``."""
    return Path(index_path).with_suffix(IVFDATA_SUFFIX)


def uses_ondisk(kind: str, n: int, policy: IndexPolicy) -> bool:
    """Whether a ``kind`` index over ``n`` vectors is built with on-disk inverted lists."""
    return kind == "ivfpq" and n >= max(2, policy.ondisk_min_vectors)


def exact_neighbours_blocked(xq: np.ndarray, xb: VectorBlocks, k: int) -> np.ndarray:
    """Exact top-``k`` rows by inner product over every block, ``(nq, k)`` int64, streamed."""
    k = min(k, len(xb))
    heap = faiss.ResultHeap(len(xq), k, keep_max=True)
    for start, chunk in xb.chunks():
        distances, positions = faiss.knn(xq, chunk, min(k, len(chunk)), faiss.METRIC_INNER_PRODUCT)
        heap.add_result(distances, np.where(positions >= 0, positions + start, -1))
    heap.finalize()
    return np.asarray(heap.I)


@dataclass(frozen=True)
class OnDiskTimings:
    """Seconds spent in each stage of :func:`build_ondisk_ivfpq`."""

    sample: float
    train: float
    fill: float
    merge: float
    tune: float


def train_ivfpq(xt: np.ndarray, nlist: int, m: int, nbits: int, policy: IndexPolicy) -> Any:
    """An empty IVF-PQ over inner product, trained on ``xt (nt, d)``."""
    index = faiss.index_factory(
        xt.shape[1], f"IVF{nlist},PQ{m}x{nbits}", faiss.METRIC_INNER_PRODUCT
    )
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.spherical = True  # k-means on the unit sphere suits cosine similarity
    ivf.cp.seed = policy.seed
    ivf.do_polysemous_training = False  # costly, and only polysemous search uses it
    index.train(xt)
    return index


def fill_blocks(trained: Any, xb: VectorBlocks, scratch: Path, block_rows: int) -> list[Path]:
    """Add every row of ``xb`` (ids = global row numbers) to copies of ``trained``, a new copy
    once one holds ``block_rows`` rows (whole chunks), each written to ``scratch``; returns the
    files in row order."""
    files: list[Path] = []
    block: Any = None
    for start, chunk in xb.chunks():
        if block is None:
            block = faiss.clone_index(trained)
        block.add_with_ids(chunk, np.arange(start, start + len(chunk), dtype=np.int64))
        last = start + len(chunk) == len(xb)
        if block.ntotal >= block_rows or last:
            files.append(scratch / f"block-{len(files):05d}.index")
            faiss.write_index(block, str(files[-1]))
            logger.info(
                "filled block %d: rows up to %d of %d", len(files), start + len(chunk), len(xb)
            )
            block = None
    return files


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what FAISS's on-disk code ``printf``s (``resizing ...``, ``IO_FLAG_ONDISK_SAME_DIR:
    updating ondisk filename ...``) to stderr: stdout belongs to the CLIs' own output."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    libc.fflush(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)  # C stdio buffers what was printed: out before fd 1 is restored
        os.dup2(saved, 1)
        os.close(saved)


def merge_blocks(trained: Any, files: Sequence[Path], index_path: Path) -> None:
    """Merge the block files' inverted lists into ``index_path``'s ivfdata and write the index.

    ``merge_ondisk`` reads the block files with ``IO_FLAG_MMAP``; only their lists are copied,
    never searched, which works on faiss 1.15 (see the module docstring)."""
    target = ivfdata_path(index_path)
    with _stdout_to_stderr():
        merge_ondisk(trained, [str(path) for path in files], str(target))
    invlists: Any = faiss.extract_index_ivf(trained).invlists
    # Record only the base name: the reader finds it next to the index (IO_FLAG_ONDISK_SAME_DIR),
    # wherever the directory has moved since.
    ondisk: Any = faiss.downcast_InvertedLists(invlists)
    ondisk.filename = target.name
    faiss.write_index(trained, str(index_path))


def read_ondisk_index(index_path: Path) -> Any:
    """Read an on-disk IVF-PQ written by :func:`build_ondisk_ivfpq` (ivfdata next to it).

    Raises ``RuntimeError`` when the ivfdata is shorter than its lists: mapped, a truncated
    file would kill the process with SIGBUS on the first access instead."""
    with _stdout_to_stderr():
        index = faiss.read_index(str(index_path), READ_FLAGS)
    invlists: Any = faiss.extract_index_ivf(index).invlists
    ondisk: Any = faiss.downcast_InvertedLists(invlists)
    data = ivfdata_path(index_path)
    found = data.stat().st_size if data.is_file() else None
    if found is None or found < int(ondisk.totsize):
        raise RuntimeError(
            f"{data} holds {found if found is not None else 'no'} bytes, its inverted lists need "
            f"{int(ondisk.totsize)}: the file is truncated or missing"
        )
    return index


def build_ondisk_ivfpq(
    xb: VectorBlocks,
    index_path: Path,
    policy: IndexPolicy,
    *,
    other: VectorBlocks | None = None,
) -> tuple[BuiltIndex, OnDiskTimings]:
    """Train, fill, merge and tune an IVF-PQ over ``xb`` with on-disk inverted lists.

    Writes ``index_path`` and its ivfdata (:func:`ivfdata_path`); scratch block files go to a
    temporary directory beside them, removed on return. ``other`` (optional) are the other
    modality's vectors, the preferred tuning queries. The returned index is the one read back
    with :data:`READ_FLAGS`, tuned as :func:`indexer.faiss_index.build_index` tunes.
    """
    n, d = xb.shape
    if n < 2:
        raise ValueError(f"an on-disk IVF-PQ needs at least 2 vectors, got {n}")
    index_path = Path(index_path)
    started = time.perf_counter()
    nlist = min(policy.ivf_nlist, n) if policy.ivf_nlist else ivf_nlist(n)
    m, nbits = pq_layout(n, d, policy.memory_budget_bytes)
    rng = np.random.default_rng(policy.seed)
    sample_rows = np.sort(
        rng.choice(n, size=min(n, policy.train_points_per_list * nlist), replace=False)
    )
    xt = xb.take(sample_rows)
    sampled = time.perf_counter()
    logger.info("training IVF%d,PQ%dx%d on %d of %d vectors", nlist, m, nbits, len(xt), n)
    trained = train_ivfpq(xt, nlist, m, nbits, policy)
    del xt
    trained_at = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".ondisk-blocks-", dir=index_path.parent) as scratch:
        files = fill_blocks(trained, xb, Path(scratch), policy.ondisk_fill_vectors)
        filled = time.perf_counter()
        merge_blocks(trained, files, index_path)
    del trained  # holds the ivfdata mapped read-write; serve the read-only copy instead
    merged = time.perf_counter()
    index = read_ondisk_index(index_path)
    xq, source = tuning_queries(xb, other, policy)
    exact = exact_neighbours_blocked(xq, xb, RECALL_K)
    recall, tuned, sweep = tune_index(index, "ivfpq", xq, exact, policy.target_recall)
    finished = time.perf_counter()
    timings = OnDiskTimings(
        sample=sampled - started,
        train=trained_at - sampled,
        fill=filled - trained_at,
        merge=merged - filled,
        tune=finished - merged,
    )
    params = {"nlist": nlist, "m": m, "nbits": nbits, **tuned}
    logger.info(
        "built on-disk ivfpq over %d vectors in %.1f s (%s): %s, recall@10 %.3f",
        n,
        finished - started,
        timings,
        params,
        recall,
    )
    built = BuiltIndex(
        index,
        "ivfpq",
        params,
        recall,
        len(xq),
        source,
        finished - started,
        sweep,
        layout="ondisk",
        files=(index_path.name, ivfdata_path(index_path).name),
    )
    return built, timings
