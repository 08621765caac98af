"""On-disk IVF-PQ benchmark: build and search an index over more vectors than we hold in RAM.

Builds an IVF-PQ with the indexer's own :func:`indexer.ondisk.build_ondisk_ivfpq` (train on
a sample, fill one block index per ``--block-rows`` rows, merge the inverted lists into one
``.ivfdata`` file) over ``--n`` generated vectors, reads it back as the store does, and
reports build time per stage, peak RSS (this process and its children), file sizes,
recall@10 against exact search on ``--queries`` held-out queries (exact search streams the
blocks through faiss brute force), and single-query latency p50/p99 at several ``nprobe``.

Vectors are generated per block from ``(seed, block)``, so they are never all in RAM and a
second pass regenerates the same rows. ``--data lowrank`` (default): unit vectors near a random
16-d subspace plus small isotropic noise, as real embeddings concentrate near a subspace of low
intrinsic dimension. ``--data clustered``: 100 random centres plus isotropic noise as large as
the centre, the model of bench/search_index.py; within a cluster the neighbours differ only by
128-d isotropic noise, which PQ codes of 32 bytes cannot rank (recall@10 ~0.4 even scanning
every list), so it measures the codes' limit more than the index. Dimension 128 by default: the usual size of an IVF-PQ benchmark
(SIFT/Deep1B), small enough that the coarse assignment of 10M vectors (N·nlist·d flops)
fits in tens of minutes on 2 cores, yet 10M vectors are 5.1 GB of float32 against ~0.4 GB
of PQ32 codes + ids on disk. ``--nlist`` defaults to 4096 rather than the indexer's
4·sqrt(N) (12.6K at 10M), which would take ~3x longer to train and fill on this CPU.

    python bench/ivfpq_ondisk.py                     # 10M vectors, d=128 (15-40 min, 2 cores)
    python bench/ivfpq_ondisk.py --n 1000000         # scaled down
    python bench/ivfpq_ondisk.py --smoke --json out.json   # seconds: CI checks that it runs
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.faiss_index import IndexPolicy, recall_at_k
from indexer.ondisk import (
    VectorBlocks,
    build_ondisk_ivfpq,
    exact_neighbours_blocked,
    ivfdata_path,
    read_ondisk_index,
)
from indexer.selection import prepare_for_selection

logger = logging.getLogger("bench.ivfpq_ondisk")

_faiss: Any = faiss  # its type stubs lack the search parameters' keyword arguments
RESULTS = Path(__file__).resolve().parent / "results" / "ivfpq_ondisk.json"
K = 10


class GeneratedBlocks(Sequence[np.ndarray]):
    """``n`` seeded unit vectors of dimension ``d`` as blocks of ``block_rows``, each generated
    when indexed (deterministic per ``(seed, block)``); ``stream`` > 0 gives other rows."""

    def __init__(
        self, n: int, d: int, block_rows: int, seed: int, data: str, stream: int = 0
    ) -> None:
        self.n, self.d, self.block_rows, self.seed, self.stream = n, d, block_rows, seed, stream
        self.data = data
        # clustered: 100 unit centres; lowrank: a (16, d) basis of the subspace.
        shape = (100, d) if data == "clustered" else (16, d)
        centres = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)

    def __len__(self) -> int:
        return math.ceil(self.n / self.block_rows)

    @overload
    def __getitem__(self, position: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, position: slice) -> Sequence[np.ndarray]: ...

    def __getitem__(self, position: int | slice) -> np.ndarray | Sequence[np.ndarray]:
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        if not 0 <= position < len(self):
            raise IndexError(position)
        rows = min(self.block_rows, self.n - position * self.block_rows)
        rng = np.random.default_rng((self.seed, self.stream, position))
        if self.data == "clustered":
            block = self.centres[rng.integers(0, len(self.centres), rows)]  # (rows, d)
            noise = 1.0 / math.sqrt(self.d)  # noise vector of norm ~1, as large as the centre
        else:
            latent = rng.standard_normal((rows, len(self.centres)), dtype=np.float32)
            block = (latent / math.sqrt(len(self.centres))) @ self.centres  # (rows, d), norm ~1
            noise = 0.1 / math.sqrt(self.d)  # noise vector of norm ~0.1
        block += rng.standard_normal(block.shape, dtype=np.float32) * noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        return block


def peak_rss_mib() -> float:
    """Peak resident memory of this process plus its largest child, MiB (Linux: KiB units)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + children) / 1024, 1)


def latency_ms(index: Any, xq: np.ndarray, nprobe: int) -> tuple[float, float]:
    """p50 / p99 of one-query searches at ``nprobe``, milliseconds."""
    params = _faiss.SearchParametersIVF(nprobe=int(nprobe))
    times = []
    for query in xq:
        started = time.perf_counter()
        index.search(query[None, :], K, params=params)
        times.append((time.perf_counter() - started) * 1000)
    return round(float(np.percentile(times, 50)), 3), round(float(np.percentile(times, 99)), 3)


def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Build, read back, measure; returns the result record."""
    xb = GeneratedBlocks(args.n, args.dim, args.block_rows, args.seed, args.data)
    queries = GeneratedBlocks(
        max(args.queries, args.latency_queries), args.dim, 1 << 20, args.seed, args.data, stream=1
    )[0]
    policy = IndexPolicy(
        ivf_nlist=args.nlist,
        tuning_queries=args.queries,
        ondisk_min_vectors=0,
        ondisk_fill_vectors=args.block_rows,
        seed=args.seed,
    )
    index_path = work_dir / "images.faiss"
    started = time.perf_counter()
    built, timings = build_ondisk_ivfpq(VectorBlocks(xb, "bench"), index_path, policy)
    build_seconds = time.perf_counter() - started
    rss_after_build = peak_rss_mib()
    tuned = {"tuned_params": built.params, "tuned_recall_at_10": round(built.recall_at_10, 4)}
    del built
    opened = time.perf_counter()
    index = read_ondisk_index(index_path)
    prepare_for_selection(index)  # what the store does at load (direct map, 8 bytes/vector)
    open_seconds = time.perf_counter() - opened
    ground_started = time.perf_counter()
    xq = np.ascontiguousarray(queries[: args.queries])
    exact = exact_neighbours_blocked(xq, VectorBlocks(xb, "bench"), K)
    exact_seconds = time.perf_counter() - ground_started
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
    rows = []
    for nprobe in sorted({p for p in args.nprobe if p <= ivf.nlist}):
        _, found = index.search(xq, K, params=_faiss.SearchParametersIVF(nprobe=nprobe))
        p50, p99 = latency_ms(index, queries[: args.latency_queries], nprobe)
        rows.append(
            {
                "nprobe": nprobe,
                "recall_at_10": round(recall_at_k(found, exact), 4),
                "p50_ms": p50,
                "p99_ms": p99,
            }
        )
        logger.info("nprobe %d: %s", nprobe, rows[-1])
    info = {
        "nlist": int(ivf.nlist),
        "m": int(ivf.pq.M),
        "nbits": int(ivf.pq.nbits),
    }
    return {
        "n": args.n,
        "dim": args.dim,
        "data": args.data,
        "block_rows": args.block_rows,
        **info,
        **tuned,
        "seconds": {
            "sample": round(timings.sample, 1),
            "train": round(timings.train, 1),
            "fill": round(timings.fill, 1),
            "merge": round(timings.merge, 1),
            "tune": round(timings.tune, 1),
            "build_total": round(build_seconds, 1),
            "open": round(open_seconds, 2),
            "exact_search": round(exact_seconds, 1),
        },
        "peak_rss_mib": {"build": rss_after_build, "total": peak_rss_mib()},
        "bytes": {
            "float32_vectors": args.n * args.dim * 4,
            "index_file": index_path.stat().st_size,
            "ivfdata_file": ivfdata_path(index_path).stat().st_size,
        },
        "recall_queries": args.queries,
        "latency_queries": args.latency_queries,
        "k": K,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10_000_000, help="vectors to index")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--block-rows", type=int, default=1_000_000, help="rows per block index")
    parser.add_argument("--queries", type=int, default=50, help="queries with exact ground truth")
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=("lowrank", "clustered"), default="lowrank")
    parser.add_argument("--work-dir", type=Path, help="where the index is built (default: temp)")
    parser.add_argument(
        "--json", type=Path, default=RESULTS, help=f"result file (default {RESULTS.name})"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.dim, args.nlist, args.block_rows = 20_000, 32, 64, 6_000
        args.queries, args.latency_queries, args.nprobe = 20, 20, [4, 16]
    if min(args.n, args.dim, args.nlist, args.block_rows, args.queries, args.latency_queries) < 1:
        parser.error("--n, --dim, --nlist, --block-rows and the query counts must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="ivfpq-ondisk-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, work_dir)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    record = {
        "command": " ".join(
            ["python bench/ivfpq_ondisk.py", *_shown(argv if argv is not None else sys.argv[1:])]
        ),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {faiss.omp_get_max_threads()} OpenMP threads, CPU",
        "faiss": faiss.__version__,
        **result,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


def _shown(argv: Sequence[str]) -> list[str]:
    """The arguments without path values (no absolute paths in the result file)."""
    shown, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument in ("--json", "--work-dir"):
            skip = True
        else:
            shown.append(argument)
    return shown


if __name__ == "__main__":
    raise SystemExit(main())
