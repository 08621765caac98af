"""Which faiss index to build for a collection, building it, and tuning its search parameter.

All indexes use inner product over L2-normalised vectors (cosine similarity). ``auto`` picks:

- ``flat`` (exact) up to :attr:`IndexPolicy.flat_max_vectors` = 50K vectors. Exact search
  needs no training or tuning and is exact; its cost grows linearly: on this 2-core CPU
  (bench/search_index.py, 768-d, one query per call, one thread) it takes ~3.4 ms at 10K
  vectors and ~49 ms at 100K, so ~25 ms at the 50K threshold;
- ``ivf`` (IVF-Flat, ``nlist ≈ 4·sqrt(N)``, spherical k-means) above that: ~0.4 ms at
  100K and ~5 ms at 1M (nlist capped at 1024 there; flat: ~1.2 s) at recall@10 ≥ 0.95
  after tuning. IVF rather than HNSW because it builds several times faster on a CPU
  (HNSW32: 7 s for 10K vectors, IVF: 0.9 s), trains on a GPU when there is one, and adds
  no link memory; ``--index hnsw`` remains available;
- ``ivfpq`` when the float32 vectors (N·d·4 bytes) would exceed
  :attr:`IndexPolicy.memory_budget_bytes`. An IVF-PQ over at least
  :attr:`IndexPolicy.ondisk_min_vectors` (1M) vectors is built from vector blocks with its
  inverted lists in a separate file, mapped at search time (:mod:`indexer.ondisk`).

The search parameter (``nprobe`` / ``efSearch``) is the smallest that reaches
:attr:`IndexPolicy.target_recall` recall@10 against exact search on a held-out query sample
(the other modality's vectors when there are enough, else stored vectors plus noise), or,
where none does (IVF-PQ codes bound recall), the smallest within 0.01 of the best recall seen.
The parameters and the recall reached are recorded in the manifest. Saved indexes are always CPU
indexes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import faiss
import numpy as np

from indexer.manifest import IndexEntry

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw", "ivf", "ivfpq")
INDEX_OPTIONS = ("auto", *INDEX_KINDS)
RECALL_K = 10
# Recall@10 given up for speed when the target is out of reach (see tune_index).
RECALL_PLATEAU = 0.01
_NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
_EF_SEARCH_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)
_ADD_BLOCK = 65_536  # vectors per add() call: bounded temporary memory on large builds


@dataclass(frozen=True)
class IndexPolicy:
    """How ``auto`` chooses and how every approximate index is built and tuned."""

    # Exact search up to this many vectors (see the module docstring and bench/search_index.py).
    flat_max_vectors: int = 50_000
    # IVF-PQ when N * d * 4 bytes of float32 vectors would exceed this.
    memory_budget_bytes: int = 16 * 1024**3
    target_recall: float = 0.95
    # Held-out queries used to measure recall@10 and tune nprobe / efSearch.
    tuning_queries: int = 500
    # IVF lists; None = ivf_nlist(n) ≈ 4·sqrt(n). Training uses this many points per list.
    ivf_nlist: int | None = None
    train_points_per_list: int = 64
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    # Noise added to stored vectors used as tuning queries (norm of the noise vector).
    query_noise: float = 0.2
    seed: int = 0
    # IVF-PQ over at least this many vectors keeps its inverted lists on disk (indexer/ondisk.py):
    # auto picks IVF-PQ only when the float32 vectors exceed memory_budget_bytes (>= 5.6M
    # vectors at d=768), where the codes too are better mapped than loaded. 0 = always.
    ondisk_min_vectors: int = 1_000_000
    # Rows per block index filled before the merge (its codes are held in RAM while filling).
    ondisk_fill_vectors: int = 1_000_000

    def __post_init__(self) -> None:
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if self.flat_max_vectors < 0 or self.memory_budget_bytes <= 0:
            raise ValueError(
                f"flat_max_vectors ({self.flat_max_vectors}) must be >= 0 and "
                f"memory_budget_bytes ({self.memory_budget_bytes}) > 0"
            )
        if self.ondisk_min_vectors < 0 or self.ondisk_fill_vectors < 1:
            raise ValueError(
                f"ondisk_min_vectors ({self.ondisk_min_vectors}) must be >= 0 and "
                f"ondisk_fill_vectors ({self.ondisk_fill_vectors}) >= 1"
            )


@dataclass(frozen=True)
class SearchSettings:
    """The search-time parameter an index is loaded with."""

    kind: str
    nprobe: int | None = None
    ef_search: int | None = None

    @classmethod
    def from_dict(cls, info: dict[str, Any]) -> SearchSettings:
        """From a manifest entry ``{"type": ..., "params": {...}}``."""
        params = info.get("params", {})
        return cls(
            kind=str(info["type"]), nprobe=params.get("nprobe"), ef_search=params.get("efSearch")
        )


@dataclass(frozen=True)
class BuiltIndex:
    """A built, tuned CPU index and what the manifest records about it."""

    index: faiss.Index
    kind: str
    params: dict[str, Any]
    recall_at_10: float
    recall_queries: int
    query_source: str
    build_seconds: float
    tuning: list[dict[str, float]] = field(default_factory=list)
    # "in_memory": one index file read whole; "ondisk": IVF-PQ whose inverted lists are in a
    # separate file mapped at search time (indexer/ondisk.py). ``files``: what it was written to.
    layout: str = "in_memory"
    files: tuple[str, ...] = ()

    def describe(self) -> IndexEntry:
        """The manifest entry for this index."""
        return IndexEntry(
            kind=self.kind,
            metric="inner_product",
            ntotal=int(self.index.ntotal),
            layout=self.layout,
            files=self.files,
            params=self.params,
            recall_at_10=round(self.recall_at_10, 4),
            recall_queries=self.recall_queries,
            recall_query_source=self.query_source,
            tuning=tuple(self.tuning),
            build_seconds=round(self.build_seconds, 3),
        )


def choose_kind(n: int, d: int, option: str, policy: IndexPolicy) -> str:
    """The index kind for ``n`` vectors of dimension ``d``: ``option`` unless it is ``auto``."""
    if option not in INDEX_OPTIONS:
        raise ValueError(f"index must be one of {INDEX_OPTIONS}, got {option!r}")
    if option != "auto":
        return option
    if n * d * 4 > policy.memory_budget_bytes:
        return "ivfpq"
    return "flat" if n <= policy.flat_max_vectors else "ivf"


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: ~4·sqrt(n), at least 39 training points per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def pq_layout(n: int, d: int, memory_budget_bytes: int) -> tuple[int, int]:
    """``(m, nbits)`` for IVF-PQ: the most sub-quantizers (≤ d/4, dividing d) the budget allows."""
    nbits = 8 if n >= 256 else max(1, int(math.log2(max(n, 2))))
    bytes_per_vector = max(1, memory_budget_bytes // max(n, 1) - 8)  # 8 bytes: the stored id
    candidates = [m for m in range(1, max(1, d // 4) + 1) if d % m == 0]
    fitting = [m for m in candidates if m * nbits / 8 <= bytes_per_vector]
    return (max(fitting) if fitting else min(candidates)), nbits


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = RECALL_K) -> float:
    """Mean share of the exact top-``k`` rows present in the approximate top-``k`` rows."""
    if len(exact) == 0:
        return 1.0
    hits = 0
    possible = 0
    for approx_row, exact_row in zip(found[:, :k], exact[:, :k], strict=True):
        truth = {int(i) for i in exact_row if i >= 0}
        hits += len(truth & {int(i) for i in approx_row if i >= 0})
        possible += len(truth)
    return hits / possible if possible else 1.0


class RowSource(Protocol):
    """Vectors that can be counted and gathered by row: an array, or blocks of one."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, rows: np.ndarray, /) -> np.ndarray: ...


def tuning_queries(
    xb: RowSource, other: RowSource | None, policy: IndexPolicy
) -> tuple[np.ndarray, str]:
    """Held-out queries for recall: the other modality's vectors if there are enough, else
    a sample of ``xb`` with noise of norm ``policy.query_noise``, re-normalised."""
    rng = np.random.default_rng(policy.seed)
    wanted = min(policy.tuning_queries, len(xb))
    if other is not None and len(other) >= min(wanted, 50):
        pick = rng.choice(len(other), size=min(wanted, len(other)), replace=False)
        return np.ascontiguousarray(other[np.sort(pick)], dtype=np.float32), "other_modality"
    pick = np.sort(rng.choice(len(xb), size=wanted, replace=False))
    noise = rng.standard_normal((wanted, xb.shape[1])).astype(np.float32)
    noise *= policy.query_noise / math.sqrt(xb.shape[1])
    queries = xb[pick] + noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return np.ascontiguousarray(queries, dtype=np.float32), "stored_vectors_with_noise"


def exact_neighbours(xq: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` rows by inner product, ``(nq, k)`` int64 (faiss brute force, no copy of xb)."""
    _, rows = faiss.knn(xq, xb, min(k, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
    return np.asarray(rows)


def apply_search_settings(index: faiss.Index, settings: SearchSettings) -> None:
    """Set ``nprobe`` / ``efSearch`` on a loaded index (no-op for flat)."""
    space = faiss.ParameterSpace()
    if settings.nprobe is not None:
        space.set_index_parameter(index, "nprobe", int(settings.nprobe))
    if settings.ef_search is not None:
        space.set_index_parameter(index, "efSearch", int(settings.ef_search))


def build_index(
    xb: np.ndarray,
    kind: str,
    policy: IndexPolicy,
    *,
    other: RowSource | None = None,
    device: str = "cpu",
) -> BuiltIndex:
    """Build a ``kind`` index over ``xb`` (float32 ``(n, d)``, unit rows) and tune it.

    ``other`` (optional, ``(m, d)``) are vectors of the other modality, used as realistic
    tuning queries. ``device="cuda"`` trains IVF / IVF-PQ on the GPU when faiss has GPU
    support; the returned index is always a CPU index.
    """
    if xb.dtype != np.float32 or xb.ndim != 2 or not xb.flags.c_contiguous or len(xb) == 0:
        raise ValueError(
            f"xb must be a non-empty C-contiguous float32 (n, d) array, got {xb.dtype} {xb.shape}"
        )
    if kind not in INDEX_KINDS:
        raise ValueError(f"kind must be one of {INDEX_KINDS}, got {kind!r}")
    n, d = xb.shape
    if kind == "ivfpq" and n < 2:  # a product quantizer cannot train on one vector
        logger.warning("ivfpq needs at least 2 vectors, got %d: building a flat index", n)
        kind = "flat"
    started = time.perf_counter()
    params: dict[str, Any] = {}
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(d)
        _add_in_blocks(index, xb)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, policy.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = policy.hnsw_ef_construction
        params = {"M": policy.hnsw_m, "efConstruction": policy.hnsw_ef_construction}
        _add_in_blocks(index, xb)
    else:
        nlist = min(policy.ivf_nlist, n) if policy.ivf_nlist else ivf_nlist(n)
        params = {"nlist": nlist}
        if kind == "ivf":
            description = f"IVF{nlist},Flat"
        else:
            m, nbits = pq_layout(n, d, policy.memory_budget_bytes)
            params |= {"m": m, "nbits": nbits}
            description = f"IVF{nlist},PQ{m}x{nbits}"
        index = faiss.index_factory(d, description, faiss.METRIC_INNER_PRODUCT)
        ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.spherical = True  # k-means on the unit sphere suits cosine similarity
        ivf.cp.seed = policy.seed
        if kind == "ivfpq":
            ivf.do_polysemous_training = False  # costly, and only polysemous search uses it
        rng = np.random.default_rng(policy.seed)
        train_rows = np.sort(
            rng.choice(n, size=min(n, policy.train_points_per_list * nlist), replace=False)
        )
        index = _train_and_add(index, xb[train_rows], xb, device)
    xq, source = tuning_queries(xb, other, policy)
    exact = exact_neighbours(xq, xb, RECALL_K)
    recall, tuned, sweep = tune_index(index, kind, xq, exact, policy.target_recall)
    params |= tuned
    elapsed = time.perf_counter() - started
    if recall < policy.target_recall:
        logger.warning(
            "%s index over %d vectors reaches recall@10 %.3f < target %.2f; using %s, "
            "within %.2f of the best recall of its sweep",
            kind,
            n,
            recall,
            policy.target_recall,
            tuned,
            RECALL_PLATEAU,
        )
    logger.info(
        "built %s index over %d vectors in %.1f s: %s, recall@10 %.3f on %d %s queries",
        kind,
        n,
        elapsed,
        params,
        recall,
        len(xq),
        source,
    )
    return BuiltIndex(index, kind, params, recall, len(xq), source, elapsed, sweep)


def _add_in_blocks(index: faiss.Index, xb: np.ndarray) -> None:
    for start in range(0, len(xb), _ADD_BLOCK):
        index.add(xb[start : start + _ADD_BLOCK])


def _train_and_add(index: faiss.Index, xt: np.ndarray, xb: np.ndarray, device: str) -> faiss.Index:
    """Train and fill an IVF index, on the GPU when asked for and available; returns a CPU index."""
    gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if device.startswith("cuda") and gpu_faiss:
        try:
            resources = faiss.StandardGpuResources()
            options = faiss.GpuClonerOptions()
            options.useFloat16 = True  # needed by GPU IVF-PQ with many sub-quantizers
            gpu_index = faiss.index_cpu_to_gpu(resources, 0, index, options)
            gpu_index.train(xt)
            _add_in_blocks(gpu_index, xb)
            logger.info("trained and filled the IVF index on the GPU")
            return faiss.index_gpu_to_cpu(gpu_index)
        except RuntimeError as exc:  # unsupported layout on GPU: the CPU path still works
            logger.warning("GPU IVF training failed (%s); training on the CPU instead", exc)
    index.train(xt)
    _add_in_blocks(index, xb)
    return index


def tune_index(
    index: faiss.Index, kind: str, xq: np.ndarray, exact: np.ndarray, target: float
) -> tuple[float, dict[str, Any], list[dict[str, float]]]:
    """Smallest search parameter reaching ``target`` recall@10 for ``xq (nq, d)`` against the
    ``exact (nq, >=10)`` rows; returns (recall, params, sweep) and leaves it set on ``index``.

    When no setting reaches ``target`` (IVF-PQ codes bound recall), the smallest one within
    :data:`RECALL_PLATEAU` of the best recall seen: scanning every list for the last 0.002 of
    recall would cost ~30x the latency (bench/ivfpq_ondisk.py: nprobe 4096 vs 64 at 10M)."""
    k = min(RECALL_K, int(index.ntotal))
    if kind == "flat":
        _, found = index.search(xq, k)
        return recall_at_k(found, exact, k), {}, []
    if kind == "hnsw":
        name, steps = "efSearch", list(_EF_SEARCH_STEPS)
    else:
        nlist = faiss.extract_index_ivf(index).nlist
        name, steps = "nprobe", sorted({s for s in _NPROBE_STEPS if s < nlist} | {nlist})
    space = faiss.ParameterSpace()
    sweep: list[dict[str, float]] = []
    recall = 0.0
    value = steps[0]
    for value in steps:
        space.set_index_parameter(index, name, value)
        _, found = index.search(xq, k)
        recall = recall_at_k(found, exact, k)
        sweep.append({name: value, "recall_at_10": round(recall, 4)})
        if recall >= target:
            return recall, {name: value}, sweep
    best = max(step["recall_at_10"] for step in sweep)
    plateau = next(step for step in sweep if step["recall_at_10"] >= best - RECALL_PLATEAU)
    value, recall = int(plateau[name]), float(plateau["recall_at_10"])
    space.set_index_parameter(index, name, value)
    return recall, {name: value}, sweep
