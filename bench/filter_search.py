"""Filtered search: latency and recall@10 of searches restricted by a metadata filter.

For each collection size and index kind (``flat``, and ``ivf``, the indexer's ``auto`` choice
above 50K vectors), a version is published through the indexer's own store
(:func:`indexer.publish.publish_vectors`: the same builder, tuning and ``metadata.sqlite``)
with a number field ``bucket`` drawn uniformly from 0..999 per image, independent of the
vectors. Filters ``{"bucket": {"lt": b}}`` select 50%, 5% and 0.1% of the rows. Per filter
(and without one) it measures

- ``select_ms``: :meth:`IndexVersion.select` (the SQL over the metadata indexes, with the
  selection cache off: the cost of a filter not seen recently), median of 3;
- ``p50_ms`` / ``p99_ms``: one query per call, ``k = 10``, as the service searches, with the
  selection made beforehand (add ``select_ms`` for a request that selects anew);
- ``recall_at_10`` against exact filtered search: brute force over the selected rows' vectors.

Vectors are the clustered unit vectors of ``bench/search_index.py`` (dimension 128 by
default: the demo model's embedding size); queries are stored vectors plus noise.

    python bench/filter_search.py                 # 100K and 1M vectors of dimension 128
    python bench/filter_search.py --smoke         # seconds: CI checks that it runs
    python bench/filter_search.py --sizes 100000 --kinds ivf --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from search_index import _latencies, clustered_unit_vectors, noisy_queries  # noqa: E402

from indexer.faiss_index import IndexPolicy, ivf_nlist, recall_at_k  # noqa: E402
from indexer.publish import ImageRow, publish_vectors  # noqa: E402
from indexer.selection import FilterPolicy  # noqa: E402
from indexer.store import IndexVersion  # noqa: E402

logger = logging.getLogger("bench.filter_search")

BUCKETS = 1000
SELECTIVITIES = (0.5, 0.05, 0.001)  # share of rows a filter selects
K = 10


@dataclass(frozen=True)
class Row:
    """One measured (size, index, filter) point."""

    vectors: int
    dim: int
    index: str
    params: str
    filter: str
    selected: int
    selectivity: float
    select_ms: float
    p50_ms: float
    p99_ms: float
    recall_at_10: float
    latency_queries: int


def publish_collection(
    root: Path, xb: np.ndarray, buckets: np.ndarray, kind: str, policy: IndexPolicy
) -> None:
    """Publish ``xb`` with one ``bucket`` number per image through the indexer's store."""
    rows = [
        ImageRow(i, f"img{i:07d}", f"/gallery/img{i:07d}.png", (), {"bucket": int(bucket)})
        for i, bucket in enumerate(buckets)
    ]
    publish_vectors(root, fingerprint="0" * 64, image_rows=rows, image_vectors=xb, index=kind,
                    policy=policy)  # fmt: skip


def exact_filtered(xq: np.ndarray, xb: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` rows among ``rows`` by inner product, ``(nq, k)``, padded with -1."""
    found = np.full((len(xq), k), -1, dtype=np.int64)
    if len(rows) == 0:
        return found
    _, positions = faiss.knn(xq, np.ascontiguousarray(xb[rows]), min(k, len(rows)),
                             metric=faiss.METRIC_INNER_PRODUCT)  # fmt: skip
    found[:, : positions.shape[1]] = rows[positions]
    return found


def bench_version(
    version: IndexVersion,
    xb: np.ndarray,
    xq: np.ndarray,
    *,
    kind: str,
    latency_queries: int,
) -> list[Row]:
    """Every filter (and none) against one opened version."""
    n, d = xb.shape
    params = ",".join(f"{k}={v}" for k, v in version.index_settings("images")["params"].items())
    filters: list[dict[str, Any] | None] = [None] + [
        {"bucket": {"lt": max(1, round(share * BUCKETS))}} for share in SELECTIVITIES
    ]
    rows: list[Row] = []
    for filter in filters:
        select_times: list[float] = []
        selection = None
        if filter is not None:
            for _ in range(3):
                started = time.perf_counter()
                selection = version.select("images", filter)
                select_times.append((time.perf_counter() - started) * 1000)
        selected = np.arange(n) if selection is None else selection.rows
        timed = min(latency_queries, len(xq))

        def search(queries: np.ndarray, k: int, selection: Any = selection) -> object:
            return version.search_images(queries, k, selection=selection)

        p50, p99 = _latencies(search, xq, timed)  # one query per call, k = 10
        _, found = version.search_images(xq, K, selection=selection)
        recall = recall_at_k(found, exact_filtered(xq, xb, selected, K), K)
        label = "none" if filter is None else json.dumps(filter, separators=(",", ":"))
        rows.append(Row(n, d, kind, params or "-", label, len(selected), round(len(selected) / n, 4),
                        round(statistics.median(select_times), 3) if select_times else 0.0,
                        round(p50, 3), round(p99, 3), round(recall, 4), timed))  # fmt: skip
        logger.info("n=%d %s filter %s: %s", n, kind, label, rows[-1])
    return rows


def bench_size(
    n: int, d: int, *, kinds: list[str], queries: int, latency_queries: int, max_nlist: int,
    seed: int, work_dir: Path, filter_policy: FilterPolicy,
) -> list[Row]:  # fmt: skip
    started = time.perf_counter()
    xb = clustered_unit_vectors(n, d, seed)
    xq = noisy_queries(xb, min(queries, n), seed + 1)
    buckets = np.random.default_rng(seed + 2).integers(0, BUCKETS, n)
    logger.info("n=%d: data in %.1f s", n, time.perf_counter() - started)
    rows: list[Row] = []
    for kind in kinds:
        root = work_dir / f"{kind}-{n}"
        policy = IndexPolicy(
            tuning_queries=min(queries, n), ivf_nlist=min(ivf_nlist(n), max_nlist), seed=seed
        )
        started = time.perf_counter()
        publish_collection(root, xb, buckets, kind, policy)
        logger.info("n=%d %s: published in %.1f s", n, kind, time.perf_counter() - started)
        with IndexVersion.open(root, filter_policy=filter_policy) as version:
            rows += bench_version(version, xb, xq, kind=kind, latency_queries=latency_queries)
        shutil.rmtree(root, ignore_errors=True)
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [
        "| vectors | index | params | filter | selected | select ms | p50 ms | p99 ms | recall@10 |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.vectors:,} | {r.index} | {r.params} | {r.filter} | {r.selectivity:.1%} "
            f"({r.selected:,}) | {r.select_ms:.2f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
            f"{r.recall_at_10:.3f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="collection sizes (default: 100000 1000000)")  # fmt: skip
    parser.add_argument("--dim", type=int, default=128,
                        help="vector dimension (default: 128, the demo model's)")  # fmt: skip
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf"],
                        choices=["flat", "ivf", "hnsw", "ivfpq"],
                        help="index kinds (default: flat ivf)")  # fmt: skip
    parser.add_argument("--queries", type=int, default=200,
                        help="queries for recall and IVF tuning (default: 200)")  # fmt: skip
    parser.add_argument("--latency-queries", type=int, default=100,
                        help="single queries timed one by one per filter (default: 100)")  # fmt: skip
    parser.add_argument("--max-nlist", type=int, default=1024,
                        help="cap on IVF nlist, as bench/search_index.py (default: 1024)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0,
                        help="faiss OpenMP threads (default: 0 = faiss default)")  # fmt: skip
    parser.add_argument("--exact-max-rows", type=int, default=FilterPolicy().exact_max_rows,
                        help="IVF / HNSW: selections up to N rows are searched exactly over their "
                        "own vectors (default: %(default)s, the indexer's)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path,
                        help="where the index versions are written (default: a temp folder)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "filter_search.json",
                        help="where the JSON results go (default: bench/results/filter_search.json)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="a seconds-long run (3,000 vectors of dimension 32) for CI")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.smoke:
        args.sizes, args.dim, args.queries, args.latency_queries = [3000], 32, 40, 20
        args.exact_max_rows = 100  # so the 50% and 5% filters take the IVF selector path
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    # The selection cache off: select_ms is the cost of a filter not seen recently.
    policy = FilterPolicy(exact_max_rows=args.exact_max_rows, selection_cache_bytes=0)
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="filter-bench-", dir=args.work_dir) as work_dir:
        for n in args.sizes:
            rows += bench_size(n, args.dim, kinds=args.kinds, queries=args.queries,
                               latency_queries=args.latency_queries, max_nlist=args.max_nlist,
                               seed=args.seed, work_dir=Path(work_dir),
                               filter_policy=policy)  # fmt: skip
    seconds = time.perf_counter() - started
    print(format_table(rows))
    print(f"\n{len(rows)} rows in {seconds:.0f} s; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} OpenMP threads")  # fmt: skip
    options = sys.argv[1:] if argv is None else argv
    result = {
        "command": " ".join(["python bench/filter_search.py", *options]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {faiss.omp_get_max_threads()} OpenMP threads, CPU",
        "faiss": faiss.__version__,
        "k": K,
        "exact_max_rows": args.exact_max_rows,
        "seconds": round(seconds, 1),
        "rows": [asdict(row) for row in rows],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
