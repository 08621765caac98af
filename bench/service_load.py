"""HTTP latency and throughput of the search API: a real uvicorn process on 127.0.0.1, driven
by an asyncio load generator (httpx, one connection per concurrent client).

For each model it builds (or reuses, under ``--work-dir``) a checkpoint and an index of random
unit vectors written with the indexer's own writer, then starts ``python -m service`` and
measures:

- time from process start to ``/readyz`` 200 (model load + warm-up + index load and checks);
- text → images and image → captions latency (p50 / p99) at concurrency 1;
- text-query throughput at concurrency 32 with micro-batching (the default window) and
  without it (``VLD_BATCH_WINDOW_MS=0``: every query is its own forward pass), in the same
  run, and their ratio; the same for image queries.

Each scenario sends at most ``--requests`` requests and stops issuing after ``--seconds``
(so a slow model bounds the run's time, not its request count); throughput is answers per
second of wall time, latency is measured per request by the client.

Models: ``demo`` (``model/assets/demo/decomposed``, when it has been built), ``b32`` (a
ViLT-B/32-sized random-weight model: hidden 768, 12 layers, 384-pixel images, 32-pixel
patches; no download) and ``tiny`` (the test model). The full run (``demo`` + ``b32`` over
100K-vector indexes) takes a few minutes on 2 CPU cores; ``--smoke`` runs the tiny model
over a small index in well under a minute and checks that every figure was produced.

    python bench/service_load.py                      # the BENCHMARKS.md figures
    python bench/service_load.py --models b32 --vectors 100000 --requests 300
    python bench/service_load.py --smoke --json-out /tmp/service_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/service_load.py` from a checkout
    sys.path.insert(0, str(ROOT))

DEMO_MODEL = ROOT / "model" / "assets" / "demo" / "decomposed"
# ViLT-B/32 (dandelin/vilt-b32-*): ViltConfig defaults with 384-pixel images and 32-pixel patches.
B32_SHAPE = {
    "image_size": 384,
    "patch_size": 32,
    "hidden_size": 768,
    "num_layers": 12,
    "num_heads": 12,
    "intermediate_size": 3072,
}
WORDS = (
    "a an the of and is to on in at with left right above below near next picture photo "
    "red green blue yellow purple orange black white grey pink small large big tiny little "
    "circle square triangle star cross diamond shape shapes one two three under over beside"
).split()


@dataclass
class Scenario:
    """One measured load pattern."""

    model: str
    name: str
    endpoint: str
    concurrency: int
    batching: bool
    requests: int = 0
    failures: int = 0
    seconds: float = 0.0
    throughput_rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_batch: float = 0.0  # queries per forward pass during the scenario (server metrics)
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass
class ModelReport:
    model: str
    dim: int
    vectors: int
    ready_s: float
    scenarios: list[Scenario]
    ratios: dict[str, float]


# ------------------------------------------------------------------------------- preparation
def prepare_model(kind: str, work_dir: Path) -> Path | None:
    """The checkpoint directory for ``kind`` (built once, reused), or None if unavailable."""
    from model.backbone import init_vilt_checkpoint
    from model.testing import make_tiny_vilt

    if kind == "demo":
        return DEMO_MODEL if (DEMO_MODEL / "config.json").is_file() else None
    target = work_dir / f"model-{kind}"
    if (target / "config.json").is_file():
        return target
    if kind == "tiny":
        return make_tiny_vilt(target)
    if kind == "b32":
        return init_vilt_checkpoint(target, words=WORDS, dropout=0.0, seed=0, **B32_SHAPE)
    raise ValueError(f"unknown model {kind!r}; expected demo, b32 or tiny")


def prepare_index(
    model_dir: Path, vectors: int, work_dir: Path, label: str, index: str = "flat"
) -> tuple[Path, int]:
    """A published index (``index``: flat, or the indexer's ``auto`` choice) of ``vectors``
    random unit vectors per modality for this model — uniformly random for flat, clustered
    (``bench.search_index.clustered_unit_vectors``) otherwise, since an IVF index over uniform
    random vectors must probe every list to find neighbours.

    Written with the indexer's writer (``indexer.publish``) so the service reads a real
    version; reused when one for the same model fingerprint and size exists.
    """
    from indexer.publish import CaptionRow, ImageRow, publish_vectors
    from indexer.store import IndexVersion, read_current
    from model import VLDeformer

    model = VLDeformer.from_pretrained(model_dir, device="cpu")
    dim, fingerprint = model.embedding_dim, model.fingerprint
    del model
    root = work_dir / (f"index-{label}-{vectors}" + ("" if index == "flat" else f"-{index}"))
    if read_current(root) is not None:
        with IndexVersion.open(root) as existing:
            if existing.fingerprint == fingerprint and existing.image_count == vectors:
                return root, dim
    gallery_image = work_dir / "gallery.png"
    _query_image(64).save(gallery_image)
    rng = np.random.default_rng(0)

    def unit(n: int) -> np.ndarray:
        if index != "flat":
            from bench.search_index import clustered_unit_vectors

            return clustered_unit_vectors(n, dim, seed=int(rng.integers(1 << 31)))
        matrix = rng.standard_normal((n, dim), dtype=np.float32)
        return np.ascontiguousarray(matrix / np.linalg.norm(matrix, axis=1, keepdims=True))

    image_rows = [
        ImageRow(row, f"img{row:07d}.png", str(gallery_image), (f"caption {row}",))
        for row in range(vectors)
    ]
    caption_rows = [
        CaptionRow(row, f"cap{row:07d}", f"caption {row}", f"img{row:07d}.png", None)
        for row in range(vectors)
    ]
    publish_vectors(
        root,
        fingerprint=fingerprint,
        image_rows=image_rows,
        image_vectors=unit(vectors),
        caption_rows=caption_rows,
        caption_vectors=unit(vectors),
        index=index,
    )
    return root, dim


def _query_image(size: int, seed: int = 0) -> Any:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.randrange(size // 2), rng.randrange(size // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.rectangle((x, y, x + size // 3, y + size // 3), fill=colour)
    return image


def query_images(count: int, size: int) -> list[bytes]:
    images = []
    for seed in range(count):
        buffer = io.BytesIO()
        _query_image(size, seed).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def query_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(count)]


# ------------------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``python -m service`` as a subprocess; ``ready_s`` is process start → /readyz 200."""

    def __init__(self, model_dir: Path, index_root: Path, log: Path, **settings: str) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLD_MODEL_DIR": str(model_dir),
            "VLD_INDEX_ROOT": str(index_root),
            "VLD_HOST": "127.0.0.1",
            "VLD_PORT": str(self.port),
            "VLD_DEVICE": "cpu",
            "VLD_LOG_LEVEL": "warning",
            **{f"VLD_{key.upper()}": value for key, value in settings.items()},
        }
        self.started = time.perf_counter()
        with log.open("wb") as stream:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service"],
                cwd=ROOT,
                env=env,
                stdout=stream,
                stderr=subprocess.STDOUT,
            )
        self.ready_s = float("nan")

    def wait_ready(self, timeout_s: float) -> float:
        import httpx

        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited ({self.process.returncode}):\n{self._log()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    self.ready_s = time.perf_counter() - self.started
                    return self.ready_s
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready within {timeout_s} s:\n{self._log()}")

    def _log(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


# ------------------------------------------------------------------------------- load
async def _drive(
    base_url: str,
    endpoint: str,
    payloads: list[Any],
    concurrency: int,
    total: int,
    max_seconds: float,
) -> tuple[list[float], dict[str, int], float]:
    """Up to ``total`` requests (issued for at most ``max_seconds``) from ``concurrency``
    clients; returns latencies (s), status counts and the wall time until the last answer."""
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    stop_at = started + max_seconds

    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:

        async def one_client() -> None:
            nonlocal issued
            while issued < total and time.perf_counter() < stop_at:
                payload = payloads[issued % len(payloads)]
                issued += 1
                sent = time.perf_counter()
                try:
                    if endpoint == "/search/images":
                        response = await client.post(endpoint, json={"text": payload, "k": 10})
                    else:
                        response = await client.post(
                            endpoint + "?k=10",
                            content=payload,
                            headers={"content-type": "image/jpeg"},
                        )
                    status = str(response.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                latencies.append(time.perf_counter() - sent)
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return latencies, statuses, time.perf_counter() - started


def batch_counts(base_url: str, modality: str) -> tuple[float, float]:
    """(queries encoded, forward passes) so far for ``modality``, from the server's /metrics."""
    import httpx

    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    values = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for kind in values:
            if line.startswith(f'vld_batch_size_{kind}{{modality="{modality}"}}'):
                values[kind] = float(line.split()[-1])
    return values["sum"], values["count"]


def measure(
    server: Server,
    scenario: Scenario,
    payloads: list[Any],
    requests: int,
    max_seconds: float,
) -> Scenario:
    """Warm the connections up (one request per client), then measure ``scenario``."""
    url, endpoint, concurrency = server.base_url, scenario.endpoint, scenario.concurrency
    modality = "text" if endpoint == "/search/images" else "image"
    asyncio.run(_drive(url, endpoint, payloads, concurrency, concurrency, max_seconds / 4))
    batches_before = batch_counts(url, modality)
    latencies, statuses, seconds = asyncio.run(
        _drive(url, endpoint, payloads, concurrency, requests, max_seconds)
    )
    queries, passes = np.subtract(batch_counts(url, modality), batches_before)
    scenario.mean_batch = round(float(queries / passes), 2) if passes else 0.0
    ms = np.asarray(latencies) * 1000.0
    scenario.requests = len(latencies)
    scenario.failures = len(latencies) - statuses.get("200", 0)
    scenario.seconds = round(seconds, 3)
    scenario.throughput_rps = round(len(latencies) / seconds, 2)
    scenario.p50_ms = round(float(np.percentile(ms, 50)), 2)
    scenario.p99_ms = round(float(np.percentile(ms, 99)), 2)
    scenario.statuses = statuses
    print(
        f"  {scenario.name:<28} c={scenario.concurrency:<3} n={scenario.requests:<4} "
        f"{scenario.throughput_rps:8.2f} req/s  p50 {scenario.p50_ms:8.1f} ms  "
        f"p99 {scenario.p99_ms:8.1f} ms  batch {scenario.mean_batch:5.1f}  statuses {statuses}",
        flush=True,
    )
    return scenario


# ------------------------------------------------------------------------------- runner
@dataclass(frozen=True)
class RunConfig:
    requests_c1: int  # at most this many requests per concurrency-1 scenario...
    seconds_c1: float  # ...issued for at most this long
    requests_c32: int  # the same for the concurrent scenarios
    seconds_c32: float
    concurrency: int
    vectors: int
    image_size: int  # side of the JPEG query images
    ready_timeout_s: float
    compare_unbatched: bool  # also run a VLD_BATCH_WINDOW_MS=0 server (a second start-up)
    torch_threads: int | None = None
    modalities: tuple[str, ...] = ("text", "image")
    runtime: str = "torch"  # VLD_RUNTIME of the server (model.runtime.RUNTIMES)
    index: str = "flat"  # the published index: flat, or the indexer's auto choice


def run_model(kind: str, config: RunConfig, work_dir: Path) -> ModelReport | None:
    model_dir = prepare_model(kind, work_dir)
    if model_dir is None:
        print(f"[{kind}] skipped: {DEMO_MODEL} is not built (make demo-model)", flush=True)
        return None
    print(f"[{kind}] preparing a {config.vectors}-vector index…", flush=True)
    index_root, dim = prepare_index(model_dir, config.vectors, work_dir, kind, config.index)
    if config.runtime != "torch":  # the index is encoded by torch; the server's runtime differs
        kind = f"{kind} {config.runtime}"
    if config.index != "flat":
        kind = f"{kind} {config.index} index"
    texts = query_texts(200)
    images = query_images(16, config.image_size)
    scenarios: list[Scenario] = []
    queue = str(max(64, 2 * config.concurrency))

    def start(batching: bool) -> Server:
        suffix = "" if batching else "-unbatched"
        extra = {} if batching else {"batch_window_ms": "0"}
        if config.torch_threads is not None:
            extra["torch_threads"] = str(config.torch_threads)
        extra["runtime"] = config.runtime
        log = work_dir / f"server-{kind.replace(' ', '-')}{suffix}.log"
        return Server(model_dir, index_root, log, queue_size=queue, **extra)

    def run_all(server: Server, batching: bool) -> None:
        mode = "batched" if batching else "unbatched"
        pairs = [
            (endpoint, payloads, label)
            for endpoint, payloads, label in (
                ("/search/images", texts, "text"),
                ("/search/captions", images, "image"),
            )
            if label in config.modalities
        ]
        if batching:
            for endpoint, payloads, label in pairs:
                scenario = Scenario(kind, f"{label} latency", endpoint, 1, True)
                scenarios.append(
                    measure(server, scenario, payloads, config.requests_c1, config.seconds_c1)
                )
        for endpoint, payloads, label in pairs:
            scenario = Scenario(
                kind, f"{label} throughput {mode}", endpoint, config.concurrency, batching
            )
            scenarios.append(
                measure(server, scenario, payloads, config.requests_c32, config.seconds_c32)
            )

    # One server at a time: a clean time-to-ready, and no CPU shared between the two.
    batched = start(batching=True)
    try:
        ready_s = batched.wait_ready(config.ready_timeout_s)
        print(f"[{kind}] dim {dim}: ready {ready_s:.2f} s after process start", flush=True)
        run_all(batched, batching=True)
    finally:
        batched.stop()
    if config.compare_unbatched:
        unbatched = start(batching=False)
        try:
            unbatched.wait_ready(config.ready_timeout_s)
            run_all(unbatched, batching=False)
        finally:
            unbatched.stop()

    by_name = {s.name: s for s in scenarios}
    ratios = {
        label: round(
            by_name[f"{label} throughput batched"].throughput_rps
            / by_name[f"{label} throughput unbatched"].throughput_rps,
            2,
        )
        for label in ("text", "image")
        if f"{label} throughput unbatched" in by_name
    }
    if ratios:
        print(f"[{kind}] batched / unbatched throughput at c={config.concurrency}: {ratios}")
    return ModelReport(kind, dim, config.vectors, round(ready_s, 2), scenarios, ratios)


def format_table(reports: list[ModelReport]) -> str:
    lines = [
        "| model | scenario | concurrency | req/s | p50 ms | p99 ms | mean batch | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        for s in report.scenarios:
            lines.append(
                f"| {report.model} | {s.name} | {s.concurrency} | {s.throughput_rps:.1f} | "
                f"{s.p50_ms:.1f} | {s.p99_ms:.1f} | {s.mean_batch:.1f} | {s.failures} |"
            )
    lines.append("")
    for report in reports:
        ratios = ", ".join(f"{label} {ratio:.2f}x" for label, ratio in report.ratios.items())
        lines.append(
            f"{report.model}: dim {report.dim}, {report.vectors} vectors per modality, ready "
            f"{report.ready_s:.2f} s after process start"
            + (f"; batched/unbatched throughput {ratios}" if ratios else "")
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/service_load.py",
        description="HTTP latency and throughput of the search API against a real uvicorn "
        "process on 127.0.0.1 (see the module docstring).",
    )
    parser.add_argument(
        "--models",
        default="demo,b32",
        help="comma-separated: demo, b32, tiny (default: demo,b32; demo is skipped if unbuilt)",
    )
    parser.add_argument("--vectors", type=int, default=100_000, help="index size per modality")
    parser.add_argument(
        "--requests", type=int, default=200, help="most requests per concurrency-1 scenario"
    )
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="most seconds per concurrency-1 scenario"
    )
    parser.add_argument(
        "--requests-concurrent",
        type=int,
        default=2000,
        help="most requests per concurrent scenario (default: 2000)",
    )
    parser.add_argument(
        "--seconds-concurrent",
        type=float,
        default=30.0,
        help="most seconds of issuing requests per concurrent scenario (default: 30)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="VLD_TORCH_THREADS for the server (default: unset = torch's default)",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="clients (default: 32)")
    parser.add_argument("--image-size", type=int, default=256, help="query JPEG side, pixels")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=ROOT / "data" / "bench" / "service",
        help="where models and indexes are built and reused (default: data/bench/service)",
    )
    parser.add_argument(
        "--modalities",
        default="text,image",
        help="which queries to measure: text (→ images), image (→ captions) or both",
    )
    parser.add_argument(
        "--runtimes",
        default="torch",
        help="comma-separated VLD_RUNTIME values to serve each model with, one after the other "
        "(torch, onnx, onnx-int8, auto; default: torch), e.g. torch,onnx-int8 to compare them "
        "in one run",
    )
    parser.add_argument(
        "--index",
        choices=("flat", "auto"),
        default="flat",
        help="the served index: flat (exact; uniformly random vectors) or the indexer's auto "
        "choice (IVF at 100K; clustered random vectors so IVF is meaningful). Default: flat",
    )
    parser.add_argument("--json-out", type=Path, help="also write the figures as JSON here")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, 2K vectors, a few requests, one server (no unbatched comparison): "
        "checks that the benchmark runs (CI)",
    )
    return parser


def results_record(reports: list[ModelReport], argv: list[str] | None) -> dict[str, Any]:
    """The JSON of a run: command, date, machine and each report. Routes are written relative
    to the service root (``search/images``) and no path of this machine is stored."""
    records = [asdict(report) for report in reports]
    for record in records:
        for scenario in record["scenarios"]:
            scenario["endpoint"] = scenario["endpoint"].lstrip("/")
    arguments = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join(["python bench/service_load.py", *arguments]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, CPU",
        "reports": records,
    }


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the `finally` blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run(args, argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.smoke:
        models = ["tiny"]
        # One server start (the slow part on a busy CPU); no unbatched comparison.
        config = RunConfig(12, 10.0, 48, 10.0, 8, 2_000, 64, 120.0, compare_unbatched=False)
    else:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
        if not modalities or set(modalities) - {"text", "image"}:
            print(f"error: --modalities takes text and/or image, got {args.modalities!r}",
                  file=sys.stderr)  # fmt: skip
            return 2
        config = RunConfig(
            args.requests, args.seconds, args.requests_concurrent, args.seconds_concurrent,
            args.concurrency, args.vectors, args.image_size, 300.0, compare_unbatched=True,
            torch_threads=args.torch_threads, modalities=modalities,
        )  # fmt: skip
    for value, name in ((config.requests_c1, "--requests"), (config.concurrency, "--concurrency")):
        if value < 1:
            print(f"error: {name} must be at least 1, got {value}", file=sys.stderr)
            return 2
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reports = []
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()] or ["torch"]
    for kind in models:
        for runtime in runtimes:
            run_config = replace(config, runtime=runtime, index=args.index)
            report = run_model(kind, run_config, args.work_dir)
            if report is not None:
                reports.append(report)
    print()
    print(format_table(reports))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(results_record(reports, argv), indent=2) + "\n", encoding="utf-8"
        )
    failed = sum(s.failures for report in reports for s in report.scenarios)
    if failed:
        print(f"error: {failed} requests failed", file=sys.stderr)
        return 1
    return 0 if reports else 1


if __name__ == "__main__":
    sys.exit(main())
