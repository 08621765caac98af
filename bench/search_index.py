"""Search benchmark: exact (flat) vs approximate indexes at growing collection sizes.

Justifies the indexer's ``auto`` threshold (``IndexPolicy.flat_max_vectors``): for each size
it measures single-query latency (p50/p99, one query per call, as the service searches),
batch throughput and recall@10 against exact search of

- ``flat``: exact inner-product search (faiss brute force);
- ``ivf``: built and tuned by the indexer's own ``build_index`` (nprobe tuned to recall@10
  >= 0.95 on its tuning queries); recall is then measured on a *separate* query set;
- ``hnsw``: the same, up to ``--hnsw-max-vectors`` (HNSW builds slowly on a CPU).

Vectors are unit-norm and clustered (100 random centres plus noise as large as the centre),
so neighbourhoods have some structure as real embeddings do; uniformly random vectors have
no near neighbours and make every approximate index look worse than it is, while one
cluster per IVF list would make IVF look better than it is. Queries are stored vectors plus
noise (the indexer's own tuning protocol), a separate set from the tuning queries.

    python bench/search_index.py                 # 10K, 100K, 1M vectors of dimension 768
    python bench/search_index.py --smoke         # seconds: CI checks that it runs
    python bench/search_index.py --sizes 10000 --dim 768 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.faiss_index import (
    IndexPolicy,
    build_index,
    exact_neighbours,
    ivf_nlist,
    recall_at_k,
)

logger = logging.getLogger("bench.search_index")


@dataclass(frozen=True)
class Row:
    """One measured (size, index) point."""

    vectors: int
    dim: int
    index: str
    params: str
    build_s: float
    recall_at_10: float
    p50_ms: float
    p99_ms: float
    batch_qps: float
    latency_queries: int


def clustered_unit_vectors(
    n: int, d: int, seed: int, clusters: int = 100, spread: float = 1.0
) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random unit centres plus noise of norm ``spread``
    (float32 ``(n, d)``). Fewer clusters than IVF lists, so neighbourhoods straddle lists."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 65_536):
        stop = min(start + 65_536, n)
        block = centres[rng.integers(0, len(centres), stop - start)]
        block += rng.standard_normal(block.shape, dtype=np.float32) * (spread / math.sqrt(d))
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def noisy_queries(xb: np.ndarray, nq: int, seed: int, noise: float = 0.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    queries = xb[rng.choice(len(xb), size=nq, replace=False)].copy()
    queries += rng.standard_normal(queries.shape, dtype=np.float32) * (
        noise / math.sqrt(xb.shape[1])
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return np.ascontiguousarray(queries)


def _latencies(search: object, xq: np.ndarray, count: int) -> tuple[float, float]:
    times = []
    for i in range(min(count, len(xq))):
        started = time.perf_counter()
        search(xq[i : i + 1], 10)  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _batch_qps(search: object, xq: np.ndarray) -> float:
    started = time.perf_counter()
    search(xq, 10)  # type: ignore[operator]
    return len(xq) / (time.perf_counter() - started)


def bench_size(
    n: int, d: int, *, queries: int, latency_queries: int, kinds: list[str],
    hnsw_max: int, max_nlist: int, seed: int,
) -> list[Row]:  # fmt: skip
    started = time.perf_counter()
    xb = clustered_unit_vectors(n, d, seed)
    xq = noisy_queries(xb, min(queries, n), seed + 1)
    exact = exact_neighbours(xq, xb, 10)
    logger.info("n=%d: data and ground truth in %.1f s", n, time.perf_counter() - started)
    rows: list[Row] = []

    # Flat: faiss brute force over xb itself (what IndexFlatIP.search runs, without a 2nd copy).
    def flat_search(q: np.ndarray, k: int) -> object:
        return faiss.knn(q, xb, k, metric=faiss.METRIC_INNER_PRODUCT)

    flat_latency = max(5, latency_queries // 5) if n >= 500_000 else latency_queries
    p50, p99 = _latencies(flat_search, xq, flat_latency)
    _, found = flat_search(xq, 10)  # type: ignore[misc]
    rows.append(Row(n, d, "flat", "-", 0.0, recall_at_k(found, exact), p50, p99,
                    _batch_qps(flat_search, xq), min(flat_latency, len(xq))))  # fmt: skip
    for kind in kinds:
        if kind == "hnsw" and n > hnsw_max:
            logger.info("n=%d: hnsw skipped (> --hnsw-max-vectors %d)", n, hnsw_max)
            continue
        policy = IndexPolicy(
            tuning_queries=min(queries, n), ivf_nlist=min(ivf_nlist(n), max_nlist), seed=seed
        )
        built = build_index(xb, kind, policy)
        _, found = built.index.search(xq, 10)
        p50, p99 = _latencies(built.index.search, xq, latency_queries)
        params = ",".join(f"{k}={v}" for k, v in built.params.items())
        rows.append(Row(n, d, kind, params, built.build_seconds, recall_at_k(found, exact), p50,
                        p99, _batch_qps(built.index.search, xq), min(latency_queries, len(xq))))  # fmt: skip
        del built
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [
        "| vectors | dim | index | params | build s | recall@10 | p50 ms | p99 ms | batch q/s |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.vectors:,} | {r.dim} | {r.index} | {r.params} | {r.build_s:.1f} | "
            f"{r.recall_at_10:.3f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.batch_qps:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Flat vs approximate search latency and recall@10 (justifies --index auto).",
        epilog="Default: 10K, 100K and 1M clustered unit vectors of dimension 768.",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[10_000, 100_000, 1_000_000],
        help="collection sizes (default: 10000 100000 1000000)",
    )
    parser.add_argument("--dim", type=int, default=768, help="vector dimension (default: 768)")
    parser.add_argument(
        "--queries",
        type=int,
        default=200,
        help="queries for recall and tuning (default: 200; 100 at >= 1M)",
    )
    parser.add_argument(
        "--latency-queries",
        type=int,
        default=100,
        help="single queries timed one by one (default: 100; a fifth for flat at 1M)",
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["ivf", "hnsw"],
        choices=["ivf", "hnsw", "ivfpq"],
        help="approximate indexes to compare with flat (default: ivf hnsw)",
    )
    parser.add_argument(
        "--hnsw-max-vectors",
        type=int,
        default=10_000,
        help="build HNSW only up to this size (default: 10000; CPU build time)",
    )
    parser.add_argument(
        "--max-nlist",
        type=int,
        default=1024,
        help="cap on IVF nlist to bound CPU training time (default: 1024)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="faiss OpenMP threads (default: 0 = faiss default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long run (2,000 vectors of dimension 64) for CI",
    )
    args = parser.parse_args(argv)  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.smoke:
        args.sizes, args.dim, args.queries, args.latency_queries = [2000], 64, 50, 20
        args.hnsw_max_vectors = 2000
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    started = time.perf_counter()
    rows: list[Row] = []
    for n in args.sizes:
        rows += bench_size(
            n, args.dim, queries=args.queries if n < 1_000_000 else min(args.queries, 100),
            latency_queries=args.latency_queries, kinds=args.kinds,
            hnsw_max=args.hnsw_max_vectors, max_nlist=args.max_nlist, seed=args.seed,
        )  # fmt: skip
    print(format_table(rows))
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} OpenMP threads")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
