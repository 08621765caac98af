"""The one-command GPU check: environment, training, indexing and serving figures on one GPU.

    python bench/gpu_check.py                 # one H100/H200: at most --budget-s (480 s)
    python bench/gpu_check.py --wheels DIR    # install the faiss GPU wheel from a carried folder
    python bench/gpu_check.py --smoke         # CPU, tiny sizes, every section (CI; ~1 min)

Sections, each in its own process (a fresh CUDA context and memory peak, a faiss installed by
the first seen by the rest, and a hard stop when one runs past its share of the budget):

1. ``environment``: torch / CUDA / GPU / faiss; on a CUDA host whose faiss has no GPU support,
   swaps in ``faiss-gpu-cu12`` (:mod:`gpu_check_env`; ``--no-install`` skips it).
2. ``training``: the decomposition trainer itself (:func:`model.train.train`: GradCache
   micro-batches, bf16 autocast on CUDA) on a random ViLT-B/32-sized model (hidden 768, 12
   layers, 384-pixel images in 32-pixel patches) and synthetic scenes rendered at 384 pixels;
   pairs/s over the steps after the first few (data loading included), and peak GPU memory.
3. ``indexer``: a real build (:func:`indexer.build.run_build`, via
   ``bench/indexer_throughput.py``) of generated 640x480 JPEGs; images/s from its manifest.
4. ``service``: a random index of ``--vectors`` image vectors published with the indexer's
   writer, ``python -m service`` (uvicorn) on 127.0.0.1, text queries at each concurrency for
   a fixed time from several client processes (:mod:`gpu_check_service`): QPS, client-side
   p50 / p99, and from ``/metrics`` the server-side encode p50 at concurrency 1 (batch 1).

The JSON (``bench/results/gpu_check.json``) holds the command, date, machine and, per section,
its figures, ``seconds`` and ``error`` (null when it ran through). A section that fails or
overruns records why and the next one runs; the exit status is 1 only when no measuring
section (training, indexer, service) produced figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for folder in (ROOT, BENCH):  # `python bench/gpu_check.py` from a checkout
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from model.atomic import replace_file  # noqa: E402

RESULTS = BENCH / "results" / "gpu_check.json"
# Share of the remaining budget each section may use; what one leaves unused passes on.
SHARES = {"environment": 0.15, "training": 0.20, "indexer": 0.25, "service": 0.40}
MEASURING = ("training", "indexer", "service")


@dataclass(frozen=True)
class Sizes:
    """What each section measures; :data:`FULL` on one GPU, :data:`SMOKE` on a CI CPU."""

    model: str  # service_load.prepare_model kind: b32 (ViLT-B/32-sized) or tiny
    device: str  # auto: cuda when the environment step finds one
    train_steps: int
    train_batch: int  # pairs per optimizer step (the contrastive batch)
    train_micro: int  # pairs per forward pass (GradCache)
    train_image_size: int  # synthetic scenes are rendered at this side, pixels
    train_skip: int  # first steps left out of pairs/s (start-up, allocator, kernel choice)
    n_images: int  # generated 640x480 JPEGs for the indexer
    vectors: int  # random image vectors in the served index
    # The indexer's --index. flat: exact search, what GPU faiss serves at 1M; random vectors
    # have no clusters, so an IVF index tuned to recall 0.95 on them probes nearly every list.
    index: str
    concurrencies: tuple[int, ...]
    load_seconds: float  # per concurrency, measured (after a short warm-up)


FULL = Sizes("b32", "auto", 50, 512, 128, 384, 5, 20_000, 1_000_000, "flat", (1, 64), 20.0)
SMOKE = Sizes("tiny", "cpu", 3, 8, 4, 64, 1, 40, 2_000, "flat", (1, 4), 3.0)


class Progress:
    """A section's figures so far, rewritten to its result file as they come: what a section
    stopped for overrunning leaves behind is still reported."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.figures: dict[str, Any] = {}

    def update(self, **figures: Any) -> None:
        self.figures.update(figures)
        with replace_file(self.path, fsync=False) as stream:
            stream.write(json.dumps(self.figures, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------- sections
def model_checkpoint(kind: str, work: Path) -> Path:
    """The random-weight checkpoint of ``kind`` (b32 or tiny), built once in ``work``."""
    import service_load

    model_dir = service_load.prepare_model(kind, work)
    assert model_dir is not None, kind  # only "demo" can be missing; it is not offered here
    return model_dir


def section_environment(spec: dict[str, Any], progress: Progress) -> None:
    from gpu_check_env import install_faiss_gpu, probe

    before = probe()
    progress.update(**before)
    if not before.get("cuda_available"):
        progress.update(faiss_install="skipped: no CUDA device")
    elif before.get("faiss_gpus", 0) > 0:
        progress.update(faiss_install="not needed: faiss already sees the GPU")
    elif spec["no_install"]:
        progress.update(faiss_install="skipped (--no-install): CPU faiss")
    else:
        wheels = Path(spec["wheels"]) if spec["wheels"] else None
        budget = spec["deadline"] - time.time() - 30  # leave time for the probes
        outcome = install_faiss_gpu(Path(spec["work_dir"]), wheels, budget)
        after = probe()
        progress.update(faiss_install=outcome, faiss=after.get("faiss"),
                        faiss_gpus=after.get("faiss_gpus", 0))  # fmt: skip


def training_figures(metrics_path: Path, batch: int, skip: int) -> dict[str, Any]:
    """pairs/s over the logged steps after the first ``skip``, from the trainer's metrics log."""
    if not metrics_path.is_file():
        return {"steps_done": 0}
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    steps = [r for r in records if "pairs_per_s" in r]
    step_seconds = [batch / r["pairs_per_s"] for r in steps]  # data wait + step
    steady = step_seconds[skip:] or step_seconds
    figures: dict[str, Any] = {"steps_done": len(steps)}
    if steady:
        figures.update(
            pairs_per_s=round(batch * len(steady) / sum(steady), 1),
            steady_steps=len(steady),
            first_step_s=round(step_seconds[0], 3),
            loss_first=round(steps[0]["loss"], 4),
            loss_last=round(steps[-1]["loss"], 4),
        )
    return figures


def section_training(spec: dict[str, Any], progress: Progress) -> None:
    import torch

    from model.synthetic import PRESETS, write_dataset
    from model.train import TrainConfig, train

    sizes, work = Sizes(**spec["sizes"]), Path(spec["work_dir"])
    started = time.perf_counter()
    model_dir = model_checkpoint(sizes.model, work)
    scenes = dataclasses.replace(
        PRESETS["tiny"], n_train=max(2 * sizes.train_batch, PRESETS["tiny"].n_train), n_val=0,
        n_test=0, image_size=sizes.train_image_size,
    )  # fmt: skip
    dataset = write_dataset(work / "train-data", scenes)
    run_dir = work / "train-run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the trainer appends to an existing log
    config = TrainConfig(
        model_path=model_dir, data_path=dataset, output_dir=run_dir, val_split=None,
        max_steps=sizes.train_steps, batch_size=sizes.train_batch,
        micro_batch_size=sizes.train_micro, warmup_steps=min(10, sizes.train_steps),
        eval_every=0, save_every=0, log_every=1, device=spec["device"],
        num_workers=0 if spec["device"] == "cpu" else min(8, (os.cpu_count() or 2) - 1),
        progress=False,
    )  # fmt: skip
    progress.update(
        model=sizes.model, device=spec["device"], steps=sizes.train_steps,
        batch_size=sizes.train_batch, micro_batch_size=sizes.train_micro,
        image_size=sizes.train_image_size, bf16_autocast=spec["device"].startswith("cuda"),
        num_workers=config.num_workers, metrics_file=str(config.metrics_path),
        prepare_s=round(time.perf_counter() - started, 1),
    )  # fmt: skip
    train(config)
    figures = training_figures(config.metrics_path, sizes.train_batch, sizes.train_skip)
    if torch.cuda.is_available() and spec["device"].startswith("cuda"):
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    progress.update(**figures)


PHOTOS_DISTINCT = 400  # distinct JPEGs; the rest of the gallery are hard links to them
PHOTO_NOISE = 9.0  # extra grain: ~100 KB per 640x480 JPEG at quality 90, like a camera photo


def write_photos(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` 640x480 photo-like JPEGs named as ``generated_gallery`` names them: its
    gradients and shapes with more grain, so they decode like ~100 KB photos, not ~60 KB."""
    import indexer_throughput
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = folder / f"{i:07d}.jpg"
        if path.exists():
            continue
        pixels = np.asarray(indexer_throughput._photo(rng, 640, 480), dtype=np.float32)
        pixels += rng.normal(0.0, PHOTO_NOISE, pixels.shape).astype(np.float32)  # (480, 640, 3)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        image.save(path, format="JPEG", quality=90)


def section_indexer(spec: dict[str, Any], progress: Progress) -> None:
    import indexer_throughput

    sizes, work = Sizes(**spec["sizes"]), Path(spec["work_dir"])
    model_dir = model_checkpoint(sizes.model, work)
    started = time.perf_counter()
    folder = work / "jpeg"
    write_photos(folder / "images", min(sizes.n_images, PHOTOS_DISTINCT))
    # Names the photos above, hard-links them up to n_images and writes the manifests.
    gallery, captions = indexer_throughput.generated_gallery(
        folder, sizes.n_images, size=(640, 480), fmt="JPEG", unique=PHOTOS_DISTINCT
    )
    distinct = {path.stat().st_ino: path.stat().st_size for path in folder.rglob("*.jpg")}
    progress.update(
        images=sizes.n_images, distinct_jpegs=len(distinct),
        jpeg_mean_kb=round(sum(distinct.values()) / max(len(distinct), 1) / 1024, 1),
        generate_s=round(time.perf_counter() - started, 1),
    )  # fmt: skip
    workers = 0 if spec["device"] == "cpu" and sizes.n_images < 100 else None
    row = indexer_throughput.measure(
        model_dir, gallery, captions, work, device=spec["device"],
        workers=max(1, (os.cpu_count() or 2) - 1) if workers is None else workers,
        batch_size=None, label=sizes.model,
    )  # fmt: skip
    progress.update(**asdict(row))


def section_service(spec: dict[str, Any], progress: Progress) -> None:
    import gpu_check_service as load
    import service_load

    sizes, work = Sizes(**spec["sizes"]), Path(spec["work_dir"])
    model_dir = model_checkpoint(sizes.model, work)
    root = work / f"service-index-{sizes.vectors}"
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    index = load.publish_random_index(model_dir, sizes.vectors, root, sizes.index)
    progress.update(
        vectors=sizes.vectors, index_kind=index["type"], index_params=index["params"],
        index_recall_at_10=index["recall_at_10"], publish_s=round(time.perf_counter() - started, 1),
    )  # fmt: skip
    server = service_load.Server(
        model_dir, root, work / "server.log", device=spec["device"],
        queue_size=str(max(256, 4 * max(sizes.concurrencies))),
    )  # fmt: skip
    texts = service_load.query_texts(512)
    processes = max(1, min(8, (os.cpu_count() or 2) // 4))
    scenarios = []
    try:
        progress.update(ready_s=round(server.wait_ready(spec["deadline"] - time.time()), 2))
        for position, concurrency in enumerate(sizes.concurrencies):
            left = spec["deadline"] - time.time() - 10  # the server's stop and the JSON
            per_scenario = left / (len(sizes.concurrencies) - position) - 6  # warm-up, start
            seconds = min(sizes.load_seconds, per_scenario)
            if seconds < 1:
                progress.update(note=f"out of time before concurrency {concurrency}")
                break
            load.warm_up(server.base_url, concurrency, min(2.0, seconds / 4), texts)
            before = {name: load.read_histogram(server.base_url, name, "text")
                      for name in ("vld_encode_seconds", "vld_search_seconds", "vld_batch_size")}  # fmt: skip
            result = load.run_load(server.base_url, concurrency, seconds, processes, texts)
            server_side = {
                name: load.read_histogram(server.base_url, name, "text").since(earlier)
                for name, earlier in before.items()
            }
            batches = server_side["vld_batch_size"]
            scenarios.append({
                **asdict(result),
                "server_encode_p50_ms": server_side["vld_encode_seconds"].quantile_ms(0.5),
                "server_encode_mean_ms": server_side["vld_encode_seconds"].mean_ms(),
                "server_search_mean_ms": server_side["vld_search_seconds"].mean_ms(),
                "mean_batch": round(batches.total / batches.count, 2) if batches.count else None,
            })  # fmt: skip
            progress.update(scenarios=scenarios)
    finally:
        server.stop()
    if scenarios and scenarios[0]["concurrency"] == 1:
        progress.update(batch1_server_encode_p50_ms=scenarios[0]["server_encode_p50_ms"])


SECTIONS: dict[str, Callable[[dict[str, Any], Progress], None]] = {
    "environment": section_environment,
    "training": section_training,
    "indexer": section_indexer,
    "service": section_service,
}


# ------------------------------------------------------------------------------- runner
def _run_section_here(name: str, spec_json: str) -> int:
    """The child side: run one section, its figures (and any error) into its result file."""
    spec = json.loads(spec_json)
    progress = Progress(Path(spec["result_path"]))
    try:
        SECTIONS[name](spec, progress)
    except BaseException as exc:  # recorded, and the next section still runs
        progress.update(
            error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:]
        )
        return 1
    return 0


def run_section(name: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run section ``name`` in a child process for at most ``timeout_s``; its report."""
    result_path = Path(spec["result_path"])
    result_path.unlink(missing_ok=True)
    started = time.perf_counter()
    log = result_path.with_suffix(".log")
    command = [sys.executable, __file__, "--run-section", name, json.dumps(spec)]
    error = None
    with log.open("wb") as stream:
        child = subprocess.Popen(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # fmt: skip
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            error = f"stopped after {timeout_s:.0f} s, its share of --budget-s"
            _stop_group(child)
    figures = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if name == "training" and "metrics_file" in figures and "pairs_per_s" not in figures:
        sizes = Sizes(**spec["sizes"])
        figures.update(training_figures(Path(figures["metrics_file"]), sizes.train_batch,
                                        sizes.train_skip))  # fmt: skip
    if error is None and child.returncode != 0 and "error" not in figures:
        tail = log.read_text(errors="replace")[-2000:]
        error = f"exited {child.returncode}: {tail}"
    error = error or figures.pop("error", None)
    seconds = round(time.perf_counter() - started, 1)
    print(f"[{name}] {seconds} s" + (f": {error.splitlines()[0]}" if error else ""), flush=True)
    return {**figures, "seconds": seconds, "error": error}


def _stop_group(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM the section's process group (its server, clients and loader workers), then
    SIGKILL what is left."""
    import signal

    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def machine() -> dict[str, Any]:
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(pages * os.sysconf("SC_PAGE_SIZE") / 2**30, 1) if pages else None,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/gpu_check.py",
        description="One-command GPU check: environment, training, indexer and service figures "
        "(see the module docstring).",
    )
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny model and sizes, every section (CI, about a minute)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, help="whole run's time (default 480; smoke 120)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"JSON report (default {RESULTS})"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when there is one)")
    parser.add_argument("--no-install", action="store_true", help="never touch the venv's faiss")
    parser.add_argument("--wheels", type=Path,
                        help="install the faiss GPU wheel from this folder (pip --no-index)")  # fmt: skip
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")  # fmt: skip
    parser.add_argument("--n-images", type=int, help="indexer JPEGs (default 20000; smoke 40)")
    parser.add_argument("--vectors", type=int, help="served vectors (default 1M; smoke 2000)")
    parser.add_argument("--index", choices=("auto", "flat", "hnsw", "ivf", "ivfpq"),
                        help="the served index (default flat)")  # fmt: skip
    parser.add_argument("--train-steps", type=int, help="training steps (default 50; smoke 3)")
    parser.add_argument("--work-dir", type=Path,
                        help="keep models, data and indexes here (default: a temporary folder, "
                        "removed at the end)")  # fmt: skip
    parser.add_argument("--run-section", nargs=2, metavar=("NAME", "SPEC"),
                        help=argparse.SUPPRESS)  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.run_section:
        return _run_section_here(*args.run_section)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        print(f"error: --sections takes {', '.join(SECTIONS)}; got {args.sections!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    sizes = SMOKE if args.smoke else FULL
    overrides = {"n_images": args.n_images, "vectors": args.vectors,
                 "train_steps": args.train_steps, "index": args.index}  # fmt: skip
    sizes = dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    budget_s = args.budget_s or (120.0 if args.smoke else 480.0)
    for value, name in ((budget_s, "--budget-s"), (sizes.n_images, "--n-images"),
                        (sizes.vectors, "--vectors"), (sizes.train_steps, "--train-steps")):  # fmt: skip
        if value <= 0:
            print(f"error: {name} must be positive, got {value}", file=sys.stderr)
            return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vldeformer-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    started, deadline = time.perf_counter(), time.time() + budget_s
    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, "bench/gpu_check.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "smoke" if args.smoke else "full",
        "budget_s": budget_s,
        "machine": machine(),
        "sizes": asdict(sizes),
        "sections": {},
    }
    device = args.device or sizes.device
    try:
        for position, name in enumerate(sections):
            left = deadline - time.time()
            share = SHARES[name] / sum(SHARES[s] for s in sections[position:])
            timeout_s = max(left * share, 10.0)
            spec = {"sizes": asdict(sizes), "work_dir": str(work), "device": device,
                    "deadline": time.time() + timeout_s, "no_install": args.no_install,
                    "wheels": str(args.wheels) if args.wheels else None,
                    "result_path": str(work / f"section-{name}.json")}  # fmt: skip
            if name != "environment" and device == "auto":
                from gpu_check_env import probe

                environment = report["sections"].get("environment") or probe()
                device = spec["device"] = "cuda" if environment.get("cuda_available") else "cpu"
            report["sections"][name] = run_section(name, spec, timeout_s)
            _write(args.out, report)  # after every section: an interrupted run still reports
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    report["device"] = device
    report["total_s"] = round(time.perf_counter() - started, 1)
    _write(args.out, report)
    print(f"wrote {args.out} ({report['total_s']} s)")
    measured = [s for s in sections if s in MEASURING]
    failed = [s for s in measured if report["sections"][s]["error"]]
    return 1 if measured and len(failed) == len(measured) else 0


def _write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
