"""The service step of ``bench/gpu_check.py``: a large random index published with the indexer's
own writer, text-query load from several client processes, and server-side figures read from
``/metrics``.

One asyncio client process tops out at a few thousand requests/s, below what one GPU server
should answer, so the load at concurrency C comes from ``processes`` copies of this file run as
``python bench/gpu_check_service.py SPEC_JSON`` (each C / processes connections, started at one
agreed instant), each printing its latencies; the figures are over the merged latencies.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for folder in (ROOT, BENCH):  # `python bench/gpu_check_service.py` from a checkout
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import service_load  # noqa: E402  (bench/service_load.py: the server wrapper and the driver)

TEXT_ENDPOINT = "/search/images"
_SAMPLE = re.compile(r"^(?P<name>\w+)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$")


def publish_random_index(model_dir: Path, vectors: int, root: Path, index: str) -> dict[str, Any]:
    """Publish ``vectors`` random unit image vectors for ``model_dir`` under ``root`` with
    :func:`indexer.publish.publish_vectors`; return the manifest's image index entry.

    Images only: text queries search the image index, and a second million-row modality
    would double the build time of a timed run.
    """
    from indexer.publish import ImageRow, publish_vectors
    from indexer.store import IndexVersion
    from model import VLDeformer

    model = VLDeformer.from_pretrained(model_dir, device="cpu")
    dim, fingerprint = model.embedding_dim, model.fingerprint
    del model
    gallery_image = root.parent / "gallery.png"
    service_load._query_image(64).save(gallery_image)
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((vectors, dim), dtype=np.float32)  # (N, D)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    rows = [
        ImageRow(row, f"img{row:07d}.png", str(gallery_image), (f"caption {row}",))
        for row in range(vectors)
    ]
    publish_vectors(root, fingerprint=fingerprint, image_rows=rows, image_vectors=xb, index=index)
    with IndexVersion.open(root) as version:
        return version.index_settings("images")


@dataclass(frozen=True)
class Histogram:
    """One Prometheus histogram series at one instant: cumulative bucket counts by ``le``."""

    buckets: dict[float, float]
    total: float
    count: float

    def since(self, before: Histogram) -> Histogram:
        return Histogram(
            {le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.total - before.total,
            self.count - before.count,
        )

    def quantile_ms(self, q: float) -> float | None:
        """Prometheus' ``histogram_quantile``: linear within the bucket that holds ``q``."""
        if self.count <= 0:
            return None
        rank, lower, below = q * self.count, 0.0, 0.0
        for le, cumulative in sorted(self.buckets.items()):
            if cumulative >= rank:
                if math.isinf(le):
                    return round(lower * 1000, 3)
                share = (rank - below) / max(cumulative - below, 1e-12)
                return round((lower + (le - lower) * share) * 1000, 3)
            lower, below = le, cumulative
        return None

    def mean_ms(self) -> float | None:
        return round(self.total / self.count * 1000, 3) if self.count > 0 else None


def read_histogram(base_url: str, name: str, modality: str) -> Histogram:
    """The ``name`` histogram for ``modality`` from the server's ``/metrics``."""
    import httpx

    buckets: dict[float, float] = {}
    total = count = 0.0
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or f'modality="{modality}"' not in match["labels"]:
            continue
        value = float(match["value"])
        if match["name"] == f"{name}_bucket":
            le = re.search(r'le="([^"]+)"', match["labels"])
            assert le is not None, line
            buckets[float(le.group(1))] = value
        elif match["name"] == f"{name}_sum":
            total = value
        elif match["name"] == f"{name}_count":
            count = value
    return Histogram(buckets, total, count)


@dataclass
class LoadResult:
    """Text queries at one concurrency for a fixed time, seen by the clients."""

    concurrency: int
    client_processes: int
    seconds: float
    requests: int = 0
    failures: int = 0
    qps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    statuses: dict[str, int] = field(default_factory=dict)


def run_load(
    base_url: str, concurrency: int, seconds: float, processes: int, texts: list[str]
) -> LoadResult:
    """``concurrency`` connections spread over ``processes`` client processes for ``seconds``."""
    processes = max(1, min(processes, concurrency))
    start_at = time.time() + 3.0  # every client is up and importing done by then
    clients = []
    for index in range(processes):
        share = concurrency // processes + (index < concurrency % processes)
        spec = {"url": base_url, "clients": share, "seconds": seconds, "start_at": start_at,
                "texts": texts[index::processes] or texts}  # fmt: skip
        clients.append(
            subprocess.Popen(
                [sys.executable, __file__, json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    result = LoadResult(concurrency, processes, seconds)
    latencies: list[float] = []
    for client in clients:
        out, err = client.communicate(timeout=seconds + 300)
        if client.returncode != 0:
            raise RuntimeError(f"load client exited {client.returncode}: {err[-2000:]}")
        answer = json.loads(out.strip().splitlines()[-1])
        latencies += answer["latencies"]
        result.qps += len(answer["latencies"]) / answer["seconds"]
        for status, n in answer["statuses"].items():
            result.statuses[status] = result.statuses.get(status, 0) + n
    ms = np.asarray(latencies) * 1000.0
    result.requests = len(latencies)
    result.failures = result.requests - result.statuses.get("200", 0)
    result.qps = round(result.qps, 1)
    if len(ms):
        result.p50_ms = round(float(np.percentile(ms, 50)), 2)
        result.p99_ms = round(float(np.percentile(ms, 99)), 2)
    return result


def warm_up(base_url: str, concurrency: int, seconds: float, texts: list[str]) -> None:
    """A short unmeasured load: connections, allocator and any lazily built kernels."""
    asyncio.run(service_load._drive(base_url, TEXT_ENDPOINT, texts, concurrency, 10**9, seconds))


def _client(spec: dict[str, Any]) -> int:
    time.sleep(max(0.0, spec["start_at"] - time.time()))
    latencies, statuses, seconds = asyncio.run(
        service_load._drive(
            spec["url"], TEXT_ENDPOINT, spec["texts"], spec["clients"], 10**9, spec["seconds"]
        )
    )
    print(json.dumps({"latencies": latencies, "statuses": statuses, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(_client(json.loads(sys.argv[1])))
