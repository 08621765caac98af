"""Encoder runtimes on the CPU: torch eager vs ONNX Runtime fp32 vs ONNX Runtime int8.

For each model, runtime and thread count: the median wall time of one forward pass
(``encode_tokens`` / ``encode_pixels`` on prepared tensors: tokenisation and image
preprocessing are the same code in every runtime and are not timed) over ``--reps``
repetitions after warm-up, and the cosine of its vectors with torch's on the same input.

    python bench/runtime_bench.py            # b32 + demo, threads 1 and 2 (about 15 min on 2 cores)
    python bench/runtime_bench.py --smoke    # seconds: CI checks that it runs

Models: ``b32``, a random-init ViLT-B/32-sized model (hidden 768, 12 layers, 12 heads,
384-pixel images in 32-pixel patches), built in the work directory; ``demo``, the committed
demo model (``model/assets/demo/decomposed``; a random model of its size when absent).
Cases: text at batch 1 and 32 (captions cut to ~16 tokens), images at batch 1 and 16
(square, the model's image size). The exports are cached in the work directory, never next
to the committed model. Output: a table, and JSON in ``bench/results/runtime_bench.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.runtime import RuntimeUnavailable, TorchEncoder, load_encoder  # noqa: E402
from model.runtime_check import check_sample, row_cosines  # noqa: E402

logger = logging.getLogger("bench.runtime_bench")

DEMO_MODEL = REPO / "model" / "assets" / "demo" / "decomposed"
RESULTS = REPO / "bench" / "results" / "runtime_bench.json"
BENCH_RUNTIMES = ("torch", "onnx", "onnx-int8")
TEXT_WORDS = 14  # + [CLS] and [SEP]: ~16 tokens


@dataclass(frozen=True)
class Row:
    """One (model, case, runtime, threads) measurement."""

    model: str
    case: str  # "text" or "image"
    batch: int
    shape: str  # tokens per text, or pixels per image
    runtime: str
    threads: int
    median_ms: float
    reps: int
    min_cosine: float  # against torch's vectors for the same input
    speedup: float  # torch median / this median, same model, case and threads


def _vilt_model(work: Path, size: str) -> Path:
    """A random-init decomposed checkpoint of ``size`` ("b32", "demo" or "tiny")."""
    from model.backbone import init_vilt_checkpoint
    from model.modeling import VLDeformer
    from model.synthetic import VOCABULARY
    from model.testing import make_tiny_vilt

    teacher = work / f"{size}-teacher"
    if size == "tiny":
        make_tiny_vilt(teacher)
    else:
        if size == "b32":  # ViltConfig defaults: ViLT-B/32
            shape = dict(image_size=384, patch_size=32, hidden_size=768, num_layers=12,
                         num_heads=12, intermediate_size=3072)  # fmt: skip
        else:
            from model.demo_model import DemoModelConfig

            demo = DemoModelConfig()
            shape = dict(image_size=demo.image_size, patch_size=demo.patch_size,
                         hidden_size=demo.hidden_size, num_layers=demo.num_layers,
                         num_heads=demo.num_heads, intermediate_size=demo.intermediate_size)  # fmt: skip
        init_vilt_checkpoint(teacher, words=list(VOCABULARY), dropout=0.0, **shape)
    out = work / size
    VLDeformer.from_pretrained(teacher).save_pretrained(out)
    return out


def resolve_model(name: str, work: Path) -> tuple[Path, str]:
    if name == "demo" and (DEMO_MODEL / "config.json").is_file():
        return DEMO_MODEL, "demo model"
    labels = {"b32": "random ViLT-B/32", "demo": "random demo-sized", "tiny": "tiny random"}
    logger.info("building a %s model in %s", labels[name], work)
    return _vilt_model(work, name), labels[name]


def _inputs(
    encoder: TorchEncoder, image_size: int, batch: int, case: str
) -> tuple[torch.Tensor, ...]:
    captions, images = check_sample()
    if case == "text":
        texts = [" ".join(c.split()[:TEXT_WORDS]) for c in (captions * 2)[:batch]]
        tokens = encoder.tokenize(texts)
        return tokens["input_ids"], tokens["attention_mask"]
    square = [
        image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        for image in (images * 2)[:batch]
    ]
    return encoder.preprocess(square)


def _median_ms(forward: Callable[[], object], reps: int, warmup: int) -> float:
    for _ in range(warmup):
        forward()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        forward()
        times.append(1000.0 * (time.perf_counter() - started))
    return statistics.median(times)


def measure_model(
    model_dir: Path, label: str, work: Path, *, threads: list[int], reps: int, warmup: int,
    cases: list[tuple[str, int]],
) -> tuple[list[Row], dict[str, dict[str, object]]]:  # fmt: skip
    """Every runtime x thread count x case for one model; also each runtime's check."""
    rows: list[Row] = []
    checks: dict[str, dict[str, object]] = {}
    cache = work / "onnx-cache"
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        reference = load_encoder(model_dir, "torch")
        assert isinstance(reference, TorchEncoder)
        config: Any = reference.network.vilt.config
        image_size = int(config.image_size)
        inputs = {case: _inputs(reference, image_size, case[1], case[0]) for case in cases}
        expected: dict[tuple[str, int], np.ndarray] = {}
        torch_ms: dict[tuple[str, int], float] = {}
        for runtime in BENCH_RUNTIMES:
            started = time.perf_counter()
            try:
                encoder = load_encoder(model_dir, runtime, cache_dir=cache, threads=n_threads)
            except RuntimeUnavailable as exc:
                logger.warning("%s %s: %s", label, runtime, exc)
                checks[runtime] = {"refused": str(exc)}
                continue
            if runtime != "torch" and runtime not in checks:
                checks[runtime] = {
                    **dataclasses.asdict(encoder.check),  # type: ignore[arg-type]
                    "export_and_check_s": round(time.perf_counter() - started, 2),
                }
            for case in cases:
                kind, batch = case
                forward = encoder.encode_tokens if kind == "text" else encoder.encode_pixels
                arguments = inputs[case]

                def run(
                    forward: Callable[..., torch.Tensor] = forward,
                    arguments: tuple[torch.Tensor, ...] = arguments,
                ) -> torch.Tensor:
                    with torch.inference_mode():
                        return forward(*arguments)

                vectors = run().float().numpy()
                if runtime == "torch":
                    expected[case] = vectors
                ms = _median_ms(run, reps, warmup)
                if runtime == "torch":
                    torch_ms[case] = ms
                shape = (
                    f"{arguments[0].shape[1]} tokens"
                    if kind == "text"
                    else f"{arguments[0].shape[2]}x{arguments[0].shape[3]} px"
                )
                cosine = float(row_cosines(expected[case], vectors).min())
                rows.append(
                    Row(
                        model=label,
                        case=kind,
                        batch=batch,
                        shape=shape,
                        runtime=runtime,
                        threads=n_threads,
                        median_ms=round(ms, 3),
                        reps=reps,
                        min_cosine=round(cosine, 6),
                        speedup=round(torch_ms[case] / ms, 2),
                    )
                )
                logger.info("%s", rows[-1])
    return rows, checks


def format_table(rows: list[Row]) -> str:
    lines = [
        f"{'model':<18} {'case':<6} {'batch':>5} {'shape':<12} {'runtime':<10} {'thr':>3} "
        f"{'median ms':>10} {'x torch':>8} {'min cos':>9}"
    ]
    for r in rows:
        lines.append(
            f"{r.model:<18} {r.case:<6} {r.batch:>5} {r.shape:<12} {r.runtime:<10} {r.threads:>3} "
            f"{r.median_ms:>10.2f} {r.speedup:>8.2f} {r.min_cosine:>9.5f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="CPU encoder runtimes: torch eager vs ONNX Runtime fp32 / int8."
    )
    parser.add_argument(
        "--models", nargs="+", choices=["b32", "demo", "tiny"], default=["b32", "demo"]
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op threads")
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    parser.add_argument("--work-dir", type=Path, help="models and exports (default: a temp dir)")
    parser.add_argument(
        "--out", type=Path, help=f"JSON results (default {RESULTS}; none for --smoke)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: tiny model, 1 thread, 3 reps (CI)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.smoke:
        args.models, args.threads, args.reps, args.warmup = ["tiny"], [1], 3, 1
    out = args.out if args.out is not None or args.smoke else RESULTS
    cases = [("text", 1), ("text", 32), ("image", 1), ("image", 16)]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vldeformer-runtime-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    started = time.perf_counter()
    rows: list[Row] = []
    checks: dict[str, dict[str, dict[str, object]]] = {}
    try:
        for name in args.models:
            model_dir, label = resolve_model(name, work)
            model_rows, checks[label] = measure_model(
                model_dir, label, work / name, threads=args.threads, reps=args.reps,
                warmup=args.warmup, cases=cases,
            )  # fmt: skip
            rows += model_rows
    finally:
        torch.set_num_threads(threads_before)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - started
    print(format_table(rows))
    print(f"\n{len(rows)} measurements in {elapsed:.0f} s; {os.cpu_count()} CPU cores")
    if out is not None:
        import onnxruntime

        options = sys.argv[1:] if argv is None else argv
        payload = {
            "command": " ".join(["python bench/runtime_bench.py", *options]),
            "date": date.today().isoformat(),
            "machine": (
                f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                f"onnxruntime {onnxruntime.__version__}"
            ),
            "seconds": round(elapsed, 1),
            "timed": "one forward pass on prepared tensors (no tokenisation / preprocessing)",
            "checks": checks,
            "rows": [asdict(row) for row in rows],
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
