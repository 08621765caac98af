"""Can the demo-sized ViLT image tower see shapes at all? A supervised probe.

    python bench/shape_probe.py                      # the demo's 64-px world, ~2 min on 1 core
    python bench/shape_probe.py --image-size 96      # the same scenes drawn at 96 px
    python bench/shape_probe.py --smoke              # a few steps (CI)

The demo models of world v2 (objects at random offsets, straddling patches) read colours almost
perfectly and shapes hardly at all (BENCHMARKS.md §1b). This probe asks whether that is the
training signal or the encoder: it trains the image tower of a freshly initialised demo ViLT
(``model.demo_model``'s shape) with a linear head on the most direct signal there is —
multi-label "does the image hold a circle / square / triangle / diamond / red / blue / ..." with
binary cross-entropy — on scenes drawn fresh for every batch (``model.synthetic.random_scene``:
no image is seen twice, so nothing can be memorised), and reports the accuracy of each label on
the 1,000 test scenes of the demo split every ``--eval-every`` steps. The base rate of each
shape label is about 0.5. It answered "the encoder": world v3 puts each object in one cell of a
board that is the patch grid at 64 px, and the probe reads shapes there within ~750 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.demo_model import DemoModelConfig, init_demo_vilt  # noqa: E402
from model.modeling import VLDeformer  # noqa: E402
from model.scenes import COLOURS, SHAPES, Scene  # noqa: E402
from model.synthetic import PRESETS, generate, random_scene, render  # noqa: E402

LABELS: tuple[str, ...] = (*SHAPES, *COLOURS)


def labels_of(scene: Scene) -> np.ndarray:
    """``(len(LABELS),)`` 0/1: which shapes and colours the scene holds."""
    present = {obj.shape for obj in scene.objects} | {obj.colour for obj in scene.objects}
    return np.array([label in present for label in LABELS], dtype=np.float32)


def to_batch(scenes: list[Scene], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes → ``pixel_values`` (B, 3, H, W) in [-1, 1] (the demo processor's normalisation,
    no resize: the images are drawn at the model's size) and labels (B, L)."""
    pixels = np.stack([np.asarray(render(scene, image_size)) for scene in scenes])  # (B, H, W, 3)
    pixel_values = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixel_values, torch.from_numpy(np.stack([labels_of(scene) for scene in scenes]))


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    config = DemoModelConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        seed=args.seed,
    )
    preset = PRESETS["tiny" if args.smoke else "demo"]
    test = [ex.scene for ex in generate(dataclasses.replace(preset, seed=0)) if ex.split == "test"]
    test_pixels, test_labels = to_batch(test, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        model = VLDeformer.from_pretrained(init_demo_vilt(config, Path(tmp)), device="cpu")
    head = torch.nn.Linear(model.embedding_dim, len(LABELS))
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=args.lr)
    full_mask = torch.ones(1, args.image_size, args.image_size, dtype=torch.long)

    def accuracy() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            vectors = torch.cat(
                [
                    model.encode_pixels(chunk, full_mask.expand(len(chunk), -1, -1))
                    for chunk in test_pixels.split(250)
                ]
            )
            correct = ((head(vectors) > 0).float() == test_labels).float().mean(0)
        model.train()
        return {label: round(float(c), 3) for label, c in zip(LABELS, correct, strict=True)}

    curve: list[dict[str, Any]] = []
    started = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            per_label = accuracy()
            row = {
                "step": step,
                "seconds": round(time.perf_counter() - started, 1),
                "shapes_mean": round(float(np.mean([per_label[s] for s in SHAPES])), 3),
                "colours_mean": round(float(np.mean([per_label[c] for c in COLOURS])), 3),
                "per_label": per_label,
            }
            curve.append(row)
            print(
                f"step {step:5d}  shapes {row['shapes_mean']:.3f} "
                + " ".join(f"{s} {per_label[s]:.2f}" for s in SHAPES)
                + f"  colours {row['colours_mean']:.3f}  {row['seconds']:.0f} s",
                flush=True,
            )
        if step == args.steps:
            break
        pixel_values, labels = to_batch(
            [random_scene(rng) for _ in range(args.batch_size)], args.image_size
        )
        vectors = model.encode_pixels(pixel_values, full_mask.expand(len(pixel_values), -1, -1))
        loss = F.binary_cross_entropy_with_logits(head(vectors), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {
        "command": "python bench/shape_probe.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}",
        "settings": {
            "image_size": args.image_size,
            "patch_size": args.patch_size,
            "hidden_size": args.hidden_size,
            "num_layers": config.num_layers,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "test_scenes": len(test),
        },
        "curve": curve,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--image-size", type=int, default=64, help="scene side in pixels")
    parser.add_argument("--patch-size", type=int, default=16, help="ViLT patch side in pixels")
    parser.add_argument("--hidden-size", type=int, default=128, help="transformer width")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="fresh scenes per step")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between evaluations")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init and scenes")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON result (default bench/results/shape_probe_<size>px.json)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny data, a few steps (CI)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.eval_every = 4, 8, 2
    result = run(args)
    out = args.out or ROOT / "bench" / "results" / f"shape_probe_{args.image_size}px.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
