"""Re-ranking as served: what the teacher adds to a text query's latency and throughput, and
where the time of one query goes (encode, search + look-up, re-rank), through the real service.

    python bench/rerank_service.py            # the demo models and gallery, ~3 min on 2 CPU cores
    python bench/rerank_service.py --smoke    # tiny random models, seconds (CI)

A real ``python -m service`` process on 127.0.0.1 serves the demo index (built here with the
indexer CLI when ``--index`` holds none) with ``VLD_TEACHER_DIR`` set; every request names
``rerank`` explicitly. Per-stage times per query are read from the server's own ``/metrics``
histograms (sum / count over the measured requests); end-to-end latency from the client. The
accuracy the re-ranker adds is measured offline by ``bench/paper_claim.py`` (recall protocol)
and ``bench/query_bench.py`` (short queries), not here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from service_load import Server  # noqa: E402

DEMO = ROOT / "model" / "assets" / "demo"
STAGES = ("encode", "search", "rerank")


def _metric_sums(base_url: str) -> dict[str, tuple[float, float]]:
    """``stage -> (sum seconds, count)`` for the text modality, from ``/metrics``."""
    import httpx

    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    out = {stage: [0.0, 0.0] for stage in STAGES}
    for line in text.splitlines():
        for stage in STAGES:
            for kind, slot in (("sum", 0), ("count", 1)):
                if line.startswith(f'vld_{stage}_seconds_{kind}{{modality="text"}}'):
                    out[stage][slot] = float(line.split()[-1])
    return {stage: (values[0], values[1]) for stage, values in out.items()}


async def _drive(
    base_url: str, texts: list[str], rerank: bool, concurrency: int, total: int, seconds: float
) -> tuple[list[float], dict[str, int], float]:
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:

        async def one_client() -> None:
            nonlocal issued
            while issued < total and time.perf_counter() < started + seconds:
                text = texts[issued % len(texts)]
                issued += 1
                sent = time.perf_counter()
                body = {"text": text, "k": 10, "rerank": rerank, "rerank_k": 20}
                response = await client.post("/search/images", json=body)
                if response.status_code == 200 and response.json()["reranked"] != rerank:
                    # Asked for and not given: the re-rank queue was full (load shed).
                    statuses["not_reranked"] = statuses.get("not_reranked", 0) + 1
                latencies.append(time.perf_counter() - sent)
                key = str(response.status_code)
                statuses[key] = statuses.get(key, 0) + 1

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return latencies, statuses, time.perf_counter() - started


def _scenario(
    server: Server, texts: list[str], rerank: bool, concurrency: int, total: int, seconds: float
) -> dict[str, Any]:
    asyncio.run(_drive(server.base_url, texts, rerank, concurrency, concurrency, seconds))  # warm
    before = _metric_sums(server.base_url)
    latencies, statuses, wall = asyncio.run(
        _drive(server.base_url, texts, rerank, concurrency, total, seconds)
    )
    after = _metric_sums(server.base_url)
    ms = np.asarray(latencies) * 1000.0
    stages: dict[str, float | None] = {}
    for stage in STAGES:
        seconds_spent = after[stage][0] - before[stage][0]
        # encode is observed per forward pass (a batch of queries), the others per query.
        count = len(latencies) if stage == "encode" else after[stage][1] - before[stage][1]
        stages[f"{stage}_ms_per_query"] = round(1000 * seconds_spent / count, 2) if count else None
    row = {
        "rerank": rerank,
        "concurrency": concurrency,
        "requests": len(latencies),
        "statuses": statuses,
        "throughput_rps": round(len(latencies) / wall, 2),
        "reranked_share": round(1 - statuses.get("not_reranked", 0) / len(latencies), 3)
        if rerank
        else None,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        **stages,
    }
    print(json.dumps(row), flush=True)
    return row


def _ensure_index(model: Path, data: Path, index: Path, preset: str) -> None:
    """The gallery (regenerated from its seed if missing) and its index, built by the CLI."""
    if (index / "CURRENT").is_file():
        return
    subprocess.run(
        [sys.executable, "-m", "model.synthetic", "--out", str(data), "--preset", preset],
        cwd=ROOT,
        check=True,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "indexer",
            "build",
            "--model",
            str(model / "decomposed"),
            "--images",
            str(data / "gallery.jsonl"),
            "--captions",
            str(data / "captions.jsonl"),
            "--out",
            str(index),
        ],
        cwd=ROOT,
        check=True,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    _ensure_index(args.models, args.data, args.index, "tiny" if args.smoke else "demo")
    captions = [json.loads(line)["caption"] for line in (args.data / "captions.jsonl").open()]
    texts = ["a red shape", "three shapes", "a blue object", *captions[: args.queries]]
    with tempfile.TemporaryDirectory() as work:
        server = Server(
            args.models / "decomposed",
            args.index,
            Path(work) / "server.log",
            teacher_dir=str(args.models / "teacher"),
            torch_threads=str(args.threads),
        )
        try:
            ready_s = server.wait_ready(120)
            rows = [
                _scenario(server, texts, rerank, concurrency, total, args.seconds)
                for concurrency, total in ((1, args.requests_c1), (args.concurrency, 100_000))
                for rerank in (False, True)
            ]
        finally:
            server.stop()
    return {
        "command": "python bench/rerank_service.py" + (" --smoke" if args.smoke else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, server torch threads {args.threads}, CPU",
        "ready_s": round(ready_s, 2),
        "rerank_k": 20,
        "rows": rows,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--models", type=Path, default=DEMO, help="folder with teacher/, decomposed/"
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "demo", help="demo gallery")
    parser.add_argument("--index", type=Path, default=ROOT / "data" / "index", help="index root")
    parser.add_argument("--queries", type=int, default=60, help="distinct captions used as queries")
    parser.add_argument("--requests-c1", type=int, default=60, help="requests at concurrency 1")
    parser.add_argument("--concurrency", type=int, default=32, help="clients of the load run")
    parser.add_argument("--seconds", type=float, default=15.0, help="longest a scenario runs")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "rerank_service.json"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few requests (CI)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        from model.testing import make_tiny_demo_models

        scratch = Path(tempfile.mkdtemp(prefix="rerank-smoke-"))
        args.models = make_tiny_demo_models(scratch / "models")
        args.data, args.index = scratch / "data", scratch / "index"
        args.queries, args.requests_c1, args.concurrency, args.seconds = 4, 4, 4, 1.0
        if args.out == build_parser().get_default("out"):
            args.out = scratch / "rerank_service.json"
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
