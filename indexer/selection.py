"""Vector search restricted to a selection of rows (a metadata filter's matches).

The restriction is applied *inside* the faiss search, through search parameters carrying an
``IDSelectorBitmap`` (one bit per row), never by filtering a fixed top-k afterwards. Per
index kind (:func:`search_selected`):

- ``flat``: the selector; exact, so every matching row can come back.
- ``ivf`` / ``ivfpq``: a selection of at most :attr:`FilterPolicy.exact_max_rows` rows is
  searched exactly over its own reconstructed vectors (cheaper than probing lists, and it
  cannot miss). A larger one is searched with the selector and ``nprobe`` scaled by
  ``1 / fraction selected`` (capped at ``nlist``), so about as many *matching* vectors are
  scanned as an unfiltered search scans vectors, which keeps recall near the tuned one.
  A query that still gets fewer than ``min(k, count)`` results is searched again with
  ``nprobe = nlist`` (all lists), which returns every match it can: k results come back
  whenever k rows match.
- ``hnsw``: small selections as for IVF; larger ones with the selector and ``efSearch``
  scaled by ``1 / fraction`` (capped at :attr:`FilterPolicy.max_ef_search`); a query that
  comes back short is searched exactly.

Results keep the unfiltered convention: ``(D, I)`` of shape ``(nq, k)``, best first, padded
with ``I = -1`` and ``D = -FLT_MAX`` (what faiss pads with) beyond the matches; an empty
selection gives an all-padding result.

The 10,000-row default: gathering and scanning 5K vectors of dimension 128 takes ~0.4 ms,
while an IVF search whose nprobe the fraction has pushed to nlist scans every list (~10 ms
at 1M vectors); ``bench/filter_search.py --exact-max-rows`` measures other choices.
:class:`SelectionCache` keeps recent selections, so a filter repeated across queries (paging,
a filter left on in the page) costs its SQL once.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

PAD_DISTANCE = float(np.finfo(np.float32).min)  # what faiss writes where a result is missing
_faiss: Any = faiss  # its type stubs lack the search parameters' keyword arguments
# Rows per reconstruct_batch call: faiss runs larger batches as an OpenMP loop, which on a
# busy machine waits milliseconds for a core; a serial copy of this many rows takes ~50 µs.
_GATHER_BLOCK = 1000
# A selection whose cache key (the filter's SQL and values) is larger than this is not cached:
# a repeated filter is worth keeping for its rows, not for kilobytes of key.
MAX_CACHED_KEY_BYTES = 4 * 1024


@dataclass(frozen=True)
class FilterPolicy:
    """How a filtered search picks its strategy (see the module docstring)."""

    # Selections up to this many rows are searched exactly over their gathered vectors.
    exact_max_rows: int = 10_000
    # Largest efSearch a filtered HNSW search may use.
    max_ef_search: int = 4096
    # Memory for recent selections (row ids + bitmap + the filter's key), reused when a filter
    # comes again; a published version never changes, so they never go stale. 0 = no cache.
    selection_cache_bytes: int = 64 * 1024**2


@dataclass(frozen=True, eq=False)
class RowSelection:
    """The rows of one modality of one index version that a filter selects.

    ``count`` is how many rows match; ``rows`` are their faiss ids, sorted int64 ``(count,)``.
    Opaque otherwise: make one with :meth:`indexer.store.IndexVersion.select` and pass it to
    that version's searches. Holds the faiss selector and the bitmap it points into.
    """

    version: str
    modality: str
    rows: np.ndarray
    ntotal: int
    count: int = field(init=False)
    _bitmap: np.ndarray = field(init=False, repr=False)
    _selector: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rows = np.ascontiguousarray(self.rows, dtype=np.int64)
        assert rows.ndim == 1 and (len(rows) == 0 or 0 <= rows[0] <= rows[-1] < self.ntotal)
        mask = np.zeros(self.ntotal, dtype=bool)
        mask[rows] = True
        bitmap = np.packbits(mask, bitorder="little")  # faiss: bit (i & 7) of byte i >> 3
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "count", len(rows))
        object.__setattr__(self, "_bitmap", bitmap)
        object.__setattr__(
            self, "_selector", faiss.IDSelectorBitmap(self.ntotal, faiss.swig_ptr(bitmap))
        )

    @property
    def selects_all(self) -> bool:
        """Whether every row matches (the search needs no selector)."""
        return self.count == self.ntotal

    @property
    def selector(self) -> Any:
        """The ``faiss.IDSelector`` of these rows (valid while this object lives)."""
        return self._selector

    @property
    def nbytes(self) -> int:
        """Memory held by the row ids and the bitmap."""
        return int(self.rows.nbytes + self._bitmap.nbytes)


class SelectionCache:
    """The most recently used selections by key, within ``max_bytes``. Thread-safe.

    An entry costs its selection's :attr:`RowSelection.nbytes` plus its key's size
    (:func:`key_nbytes`: a filter's SQL and values); a key over ``max_key_bytes`` (a long
    ``in`` list, long strings) is not kept at all, so that the cache's memory stays within
    ``max_bytes`` whatever the filters, and small keys are what it holds.
    """

    def __init__(self, max_bytes: int, max_key_bytes: int = MAX_CACHED_KEY_BYTES) -> None:
        self.max_bytes = max_bytes
        self.max_key_bytes = max_key_bytes
        self._entries: OrderedDict[Hashable, tuple[RowSelection, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """The accounted memory of the entries held: selections and keys."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: Hashable) -> RowSelection | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, selection: RowSelection) -> None:
        key_bytes = key_nbytes(key)
        cost = selection.nbytes + key_bytes
        if key_bytes > self.max_key_bytes or cost > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (selection, cost)
            self._bytes += cost
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted


def key_nbytes(key: Hashable) -> int:
    """Memory held by a cache key: the tuple and each of its parts (strings, numbers), as
    ``sys.getsizeof`` counts them."""
    parts = key if isinstance(key, tuple) else (key,)
    return sys.getsizeof(parts) + sum(sys.getsizeof(part) for part in parts)


def search_selected(
    index: faiss.Index,
    xq: np.ndarray,
    k: int,
    selection: RowSelection,
    policy: FilterPolicy | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Search ``index`` for ``xq (nq, d)`` among ``selection``'s rows only: ``(D, I)``, ``(nq, k)``."""
    policy = policy or FilterPolicy()
    if selection.selects_all:
        distances, rows = index.search(xq, k)
        return distances, rows
    if selection.count == 0:
        return _padded(len(xq), k)
    ivf = _ivf(index)
    if ivf is None and not isinstance(index, faiss.IndexHNSW):  # flat
        distances, rows = index.search(
            xq, k, params=_faiss.SearchParameters(sel=selection.selector)
        )
        return distances, rows
    if selection.count <= policy.exact_max_rows:
        return search_exact(index, xq, k, selection)
    fraction = selection.count / selection.ntotal
    if ivf is not None:
        nprobe = min(ivf.nlist, math.ceil(ivf.nprobe / fraction))
        distances, rows = _search_ivf(index, xq, k, selection, nprobe)
        short = _short_queries(rows, k, selection.count)
        if short.any() and nprobe < ivf.nlist:
            distances[short], rows[short] = _search_ivf(
                index, np.ascontiguousarray(xq[short]), k, selection, ivf.nlist
            )
        return distances, rows
    hnsw = _faiss.downcast_index(index).hnsw
    ef_search = min(policy.max_ef_search, max(k, math.ceil(hnsw.efSearch / fraction)))
    params = _faiss.SearchParametersHNSW(sel=selection.selector, efSearch=ef_search)
    distances, rows = index.search(xq, k, params=params)
    short = _short_queries(rows, k, selection.count)
    if short.any():
        distances[short], rows[short] = search_exact(
            index, np.ascontiguousarray(xq[short]), k, selection
        )
    return distances, rows


def search_exact(
    index: faiss.Index, xq: np.ndarray, k: int, selection: RowSelection
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner product over the selected rows' stored vectors (IVF-PQ: decoded)."""
    if selection.count == 0:
        return _padded(len(xq), k)
    vectors = np.empty((selection.count, index.d), dtype=np.float32)  # (count, d)
    for start in range(0, selection.count, _GATHER_BLOCK):
        block = slice(start, start + _GATHER_BLOCK)
        index.reconstruct_batch(selection.rows[block], vectors[block])
    found = min(k, selection.count)
    scores, positions = faiss.knn(xq, vectors, found, metric=faiss.METRIC_INNER_PRODUCT)
    distances, rows = _padded(len(xq), k)
    distances[:, :found] = scores
    rows[:, :found] = np.where(positions >= 0, selection.rows[positions], -1)
    return distances, rows


def prepare_for_selection(index: faiss.Index) -> None:
    """Let an IVF index reconstruct stored vectors by id (a direct map, 8 bytes per vector).

    Done once at load: building the map later, during concurrent searches, would not be safe.
    """
    ivf = _ivf(index)
    if ivf is not None and ivf.direct_map.no():
        ivf.make_direct_map()


def _search_ivf(
    index: faiss.Index, xq: np.ndarray, k: int, selection: RowSelection, nprobe: int
) -> tuple[np.ndarray, np.ndarray]:
    params = _faiss.SearchParametersIVF(sel=selection.selector, nprobe=int(nprobe))
    distances, rows = index.search(xq, k, params=params)
    return distances, rows


def _short_queries(rows: np.ndarray, k: int, count: int) -> np.ndarray:
    """Queries with fewer results than there are matches to fill ``k`` with, ``(nq,)`` bool."""
    return np.asarray((rows >= 0).sum(axis=1) < min(k, count))


def _padded(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), PAD_DISTANCE, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def _ivf(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
