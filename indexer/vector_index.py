"""The seam between a published version and the library that searches its vectors.

:class:`indexer.store.IndexVersion` talks to each modality's vectors only through
:class:`VectorIndex`: search (optionally restricted to a :class:`RowSelection`), stored
vectors by row, and a self-check. :class:`FaissVectorIndex` is the one implementation: a
faiss index file in the version directory (flat, IVF, HNSW, IVF-PQ; IVF-PQ possibly with its
inverted lists in a separate on-disk file, :mod:`indexer.ondisk`). Another backend (a vector
database holding the version's collection, say) implements the same protocol and is picked
in :func:`open_vector_index` by the manifest entry's ``backend`` (:data:`BACKENDS`); the
service needs no change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from indexer.errors import StoreError
from indexer.faiss_index import SearchSettings, apply_search_settings
from indexer.ondisk import read_ondisk_index
from indexer.selection import FilterPolicy, RowSelection, prepare_for_selection, search_selected

logger = logging.getLogger(__name__)

DEFAULT_BACKEND = "faiss"


class VectorIndexError(StoreError):
    """An index that cannot be read or does not match what its manifest entry says."""


class VectorIndex(Protocol):
    """The vectors of one modality of one version: ``count`` rows of dimension ``dim``.

    Rows are 0..count-1 in build order (the metadata rows). Implementations are read-only and
    safe to search from several threads.
    """

    @property
    def kind(self) -> str:
        """The index type the manifest records (``flat``, ``ivf``, ``hnsw``, ``ivfpq``)."""
        ...

    @property
    def count(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def search(
        self, xq: np.ndarray, k: int, selection: RowSelection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows for unit float32 queries ``xq (nq, dim)`` (checked by the caller):
        ``(D, I)``, ``(nq, k)`` float32 inner products and int64 rows, best first, padded with
        ``I = -1``, ``D = -FLT_MAX``. With ``selection``, only its rows come back."""
        ...

    def reconstruct(self, rows: Sequence[int]) -> np.ndarray:
        """Stored vectors of valid ``rows``, float32 ``(len(rows), dim)`` (decoded: approximate
        for lossy codes)."""
        ...

    def verify(self) -> list[str]:
        """Problems found by searching sample stored vectors (``[]`` when sound)."""
        ...


@dataclass
class FaissVectorIndex:
    """A :class:`VectorIndex` over a loaded CPU faiss index, tuned as its manifest says."""

    index: faiss.Index
    kind: str
    name: str  # for messages: the modality
    filter_policy: FilterPolicy

    @classmethod
    def open(
        cls, path: Path, info: Mapping[str, Any], name: str, filter_policy: FilterPolicy
    ) -> FaissVectorIndex:
        """Read ``path`` as its manifest entry ``info`` describes (layout, search settings)."""
        try:
            if info.get("layout") == "ondisk":
                index = read_ondisk_index(path)
            else:
                index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise VectorIndexError(f"cannot read the faiss index {path}: {exc}") from exc
        apply_search_settings(index, SearchSettings.from_dict(dict(info)))
        prepare_for_selection(index)
        return cls(index, str(info["type"]), name, filter_policy)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(
        self, xq: np.ndarray, k: int, selection: RowSelection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if selection is None:
            distances, rows = self.index.search(xq, k)
            return distances, rows
        return search_selected(self.index, xq, k, selection, self.filter_policy)

    def reconstruct(self, rows: Sequence[int]) -> np.ndarray:
        if not len(rows):
            return np.empty((0, self.dim), dtype=np.float32)
        # The IVF direct map was made at load (prepare_for_selection); works on on-disk lists.
        vectors = [self.index.reconstruct(int(row)) for row in rows]
        return np.stack(vectors).astype(np.float32, copy=False)

    def verify(self) -> list[str]:
        """Sample stored vectors must come back as their own best match, up to ties.

        A vector's own score is ``<v, v>``; an exact index must return nothing scoring higher
        and must return the vector itself unless the whole top ``k`` ties with it
        (near-duplicates). Lossy IVF-PQ codes only need the row somewhere in the top ``k``.
        """
        n = self.count
        rows = sorted({int(r) for r in np.linspace(0, n - 1, num=min(n, 16)).round()})
        vectors = np.ascontiguousarray(self.reconstruct(rows))
        k = min(10, n)
        distances, found = self.index.search(vectors, k)
        problems = []
        for query, row in enumerate(rows):
            hits = [int(i) for i in found[query]]
            own = float(vectors[query] @ vectors[query])
            tolerance = 1e-4 * max(1.0, abs(own))
            if self.kind == "ivfpq":
                ok = row in hits
            elif row in hits:
                top = float(distances[query][0])
                ok = float(distances[query][hits.index(row)]) >= top - tolerance
            else:
                ok = float(distances[query][-1]) >= own - tolerance
            if not ok:
                rank = hits.index(row) + 1 if row in hits else f"> {k}"
                problems.append(f"self-query: {self.name} row {row} came back at rank {rank}")
        return problems


OpenBackend = Callable[[Path, Mapping[str, Any], str, FilterPolicy], VectorIndex]
# Readers by the manifest entry's ``backend`` (absent: "faiss"). A new backend registers its
# reader here; the store and the service need no change.
BACKENDS: dict[str, OpenBackend] = {DEFAULT_BACKEND: FaissVectorIndex.open}


def open_vector_index(
    path: Path, info: Mapping[str, Any], name: str, filter_policy: FilterPolicy
) -> VectorIndex:
    """The :class:`VectorIndex` a manifest entry ``info`` describes, its file at ``path``."""
    backend = str(info.get("backend", DEFAULT_BACKEND))
    reader = BACKENDS.get(backend)
    if reader is None:
        raise VectorIndexError(
            f"{name}: the manifest names backend {backend!r}; this store reads {sorted(BACKENDS)}"
        )
    return reader(path, info, name, filter_policy)
