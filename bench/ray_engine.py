"""The local engine vs the ray engine on the demo gallery: images/s and Ray's start-up overhead.

Each measurement is a real images-only build (``indexer.build.run_build``) of the demo gallery
(``data/demo/gallery.jsonl``: ``make demo-data``) with the committed demo model, on this
machine: the local engine (decoding processes + forward pass here), then the ray engine on a
local cluster it starts with this machine's CPUs (``--ray-workers`` encoder actors, decoding
in Ray tasks on the other CPUs).

    python bench/ray_engine.py                 # -> bench/results/ray_engine.json
    python bench/ray_engine.py --smoke         # 40 images, seconds: CI checks that it runs

Figures: ``images_per_s`` = encoded images / encoding-stage seconds (the engine's work, from
its start to the last shard written; the ray figure includes starting the cluster),
``cluster_start_s`` = ``ray.init`` of a local cluster, ``first_batch_s`` = from the start of
the encoding stage until the first encoded batch reached the driver (cluster start, actor
start-up and model load included), ``after_first_batch_images_per_s`` = encoded images /
(encode_s - first_batch_s), the rate once the pipeline runs, ``build_s`` = the whole build (model load, index, publish).
On one machine Ray can only add overhead; its case is many machines (README).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.build import BuildConfig, run_build  # noqa: E402
from indexer.engines import RayOptions  # noqa: E402

DEMO_MODEL = REPO / "model" / "assets" / "demo" / "decomposed"
DEMO_GALLERY = REPO / "data" / "demo" / "gallery.jsonl"
RESULTS = REPO / "bench" / "results" / "ray_engine.json"


@dataclass(frozen=True)
class Row:
    """One build's figures."""

    engine: str
    images: int
    skipped: int
    images_per_s: float
    after_first_batch_images_per_s: float  # the rate once the pipeline runs
    encode_s: float
    first_batch_s: float
    cluster_start_s: float
    build_s: float


def _gallery_subset(source: Path, count: int, folder: Path) -> Path:
    """The first ``count`` entries of a JSONL gallery, with paths made absolute."""
    lines = source.read_text(encoding="utf-8").splitlines()[:count]
    records = []
    for line in lines:
        record = json.loads(line)
        record["path"] = str((source.parent / record["path"]).resolve())
        records.append(json.dumps(record))
    subset = folder / "gallery.jsonl"
    subset.write_text("\n".join(records) + "\n", encoding="utf-8")
    return subset


def _measure(config: BuildConfig) -> Row:
    started = time.perf_counter()
    result = run_build(config)
    counts, build = result.manifest.counts, result.manifest.build
    assert build is not None and build.images is not None, "a build records its image stage"
    images = build.images
    return Row(
        engine=config.engine,
        images=counts.images,
        skipped=counts.skipped or 0,
        images_per_s=images["items_per_s"],
        after_first_batch_images_per_s=round(
            images["encoded"] / max(images["seconds"] - images["first_batch_seconds"], 1e-3), 1
        ),
        encode_s=images["seconds"],
        first_batch_s=images["first_batch_seconds"],
        cluster_start_s=build.engine.details.get("cluster_start_seconds", 0.0)
        if build.engine is not None
        else 0.0,
        build_s=round(time.perf_counter() - started, 3),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--gallery", type=Path, default=DEMO_GALLERY)
    parser.add_argument("--n-images", type=int, default=1000, help="first N of the gallery")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--ray-workers", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="40 images, no results file")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.gallery.is_file():
        print(f"error: no gallery at {args.gallery}; run `make demo-data`", file=sys.stderr)
        return 2
    count = 40 if args.smoke else args.n_images
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as work:
        folder = Path(work)
        gallery = _gallery_subset(args.gallery, count, folder)
        base = BuildConfig(
            model_dir=args.model,
            out_root=folder / "local",
            images=gallery,
            device="cpu",
            batch_size=args.batch_size,
            shard_size=args.shard_size,
        )
        rows = [_measure(base)]
        shutil.rmtree(folder / "local")
        ray_config = dataclasses.replace(
            base,
            out_root=folder / "ray",
            engine="ray",
            ray=RayOptions(workers=args.ray_workers, gpus_per_worker=0),
        )
        rows.append(_measure(ray_config))
    for row in rows:
        print(
            f"{row.engine:<6} {row.images} images: {row.images_per_s:.1f} images/s "
            f"({row.after_first_batch_images_per_s:.0f} after the first batch; "
            f"encode stage {row.encode_s:.1f} s, first batch after {row.first_batch_s:.1f} s, "
            f"cluster start {row.cluster_start_s:.1f} s, whole build {row.build_s:.1f} s)"
        )
    if not args.smoke:
        report = {
            "command": " ".join(
                ["python", "bench/ray_engine.py", *(argv if argv is not None else sys.argv[1:])]
            ),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, encoding on the CPU",
            "python": platform.python_version(),
            "ray": _ray_version(),
            "model": "model/assets/demo/decomposed" if args.model == DEMO_MODEL else "custom",
            "gallery": f"first {count} of data/demo/gallery.jsonl",
            "settings": {
                "batch_size": args.batch_size,
                "shard_size": args.shard_size,
                "ray_workers": args.ray_workers,
                "device": "cpu",
            },
            "rows": [asdict(row) for row in rows],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(
            f"wrote {args.json.relative_to(REPO) if args.json.is_relative_to(REPO) else args.json}"
        )
    return 0


def _ray_version() -> str:
    import ray

    return str(ray.__version__)


if __name__ == "__main__":
    sys.exit(main())
