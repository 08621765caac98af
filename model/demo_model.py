"""Build the demo models from nothing: the paper's two stages on the synthetic scenes.

(a) *VL transformer learning*: a small ViLT, randomly initialised, trained as an
    early-interaction model on image-text matching with hard negatives (``model.itm``) — the
    teacher, which also serves :class:`model.EarlyInteraction` for the baseline and re-ranking.
(b) *VL decomposition*: the teacher's weights fine-tuned with the bi-modal contrastive loss
    through ``model.train`` — the same entry point a real ViLT checkpoint goes through.

``make demo-model`` runs both with fixed seeds and writes ``model/assets/demo/{teacher,decomposed}``
plus ``fingerprints.json``; the benchmark (``bench/paper_claim.py``) reuses the stages for its
ablations (decomposition from scratch, uni-modal negatives) at the same budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.backbone import init_vilt_checkpoint
from model.files import file_sha256
from model.itm import ItmConfig, train_teacher
from model.modeling import VLDeformer
from model.synthetic import PRESETS, VOCABULARY, write_dataset
from model.train import TrainConfig, train

logger = logging.getLogger(__name__)

FINGERPRINTS_FILE = "fingerprints.json"


@dataclass(frozen=True)
class DemoModelConfig:
    """Sizes and budgets of the demo models; every number fixed so a rebuild reproduces them."""

    out_dir: Path = Path("model/assets/demo")
    data_dir: Path = Path("data/demo")
    preset: str = "demo"  # model.synthetic preset of the training data ("tiny" in tests)
    seed: int = 0
    # The ViLT: 64x64 images in 16-pixel patches (16 patches + [CLS]), 4 layers of width 128.
    image_size: int = 64
    patch_size: int = 16
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    # Stage (a): image-text matching.
    teacher_steps: int = 1600
    teacher_batch_size: int = 32
    teacher_lr: float = 5e-4
    # Stage (b): decomposition.
    decompose_steps: int = 1000
    decompose_batch_size: int = 96
    decompose_lr: float = 2e-4
    temperature: float = 0.05
    negatives: str = "bimodal"
    from_scratch: bool = False  # ablation: decompose the random initialisation, not the teacher


def write_fingerprints(out_dir: Path) -> dict[str, str]:
    """Record the decomposed model's fingerprint and the teacher's weight hash next to them."""
    fingerprints = {
        "decomposed": VLDeformer.from_pretrained(out_dir / "decomposed", device="cpu").fingerprint,
        "teacher_weights_sha256": file_sha256(out_dir / "teacher" / "model.safetensors"),
    }
    (out_dir / FINGERPRINTS_FILE).write_text(json.dumps(fingerprints, indent=2) + "\n")
    return fingerprints


def build_teacher(config: DemoModelConfig, work_dir: Path) -> Path:
    """Stage (a): a fresh ViLT trained on image-text matching → ``out_dir/teacher``."""
    init_dir = init_vilt_checkpoint(
        work_dir / "init",
        words=VOCABULARY,
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        seed=config.seed,
    )
    return train_teacher(
        ItmConfig(
            init_model=str(init_dir),
            data=str(config.data_dir / "dataset.json"),
            output_dir=str(config.out_dir / "teacher"),
            max_steps=config.teacher_steps,
            batch_size=config.teacher_batch_size,
            lr=config.teacher_lr,
            warmup_steps=max(1, config.teacher_steps // 10),
            seed=config.seed,
        )
    )


def decompose(config: DemoModelConfig, start: Path, work_dir: Path) -> Path:
    """Stage (b): contrastive decomposition of ``start`` through ``model.train`` → ``out_dir/decomposed``."""
    final = train(
        TrainConfig(
            model_path=start,
            data_path=config.data_dir / "dataset.json",
            output_dir=work_dir / "decompose",
            val_max_images=500,
            max_steps=config.decompose_steps,
            batch_size=config.decompose_batch_size,
            lr=config.decompose_lr,
            warmup_steps=max(1, config.decompose_steps // 10),
            min_lr_ratio=0.05,
            temperature=config.temperature,
            negatives=config.negatives,
            eval_every=0,
            save_every=0,
            seed=config.seed,
            device="cpu",
            num_workers=1,
        )
    )
    target = config.out_dir / "decomposed"
    if target.exists():
        shutil.rmtree(target)
    model = VLDeformer.from_pretrained(final, device="cpu")
    model.save_pretrained(target)
    return target


def build_demo_models(config: DemoModelConfig) -> dict[str, str]:
    """Run both stages; returns timings and fingerprints (also written to ``build.json``)."""
    started = time.perf_counter()
    write_dataset(config.data_dir, dataclasses.replace(PRESETS[config.preset], seed=config.seed))
    config.out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = config.out_dir.parent / f".work-{config.out_dir.name}"
    if work_dir.exists():
        shutil.rmtree(work_dir)
    teacher = build_teacher(config, work_dir)
    teacher_seconds = time.perf_counter() - started
    start = work_dir / "init" if config.from_scratch else teacher
    decompose(config, start, work_dir)
    total_seconds = time.perf_counter() - started
    shutil.rmtree(work_dir, ignore_errors=True)
    fingerprints = write_fingerprints(config.out_dir)
    record = {
        "config": {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()
        },
        "teacher_seconds": round(teacher_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        **fingerprints,
    }
    (config.out_dir / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoModelConfig()
    parser = argparse.ArgumentParser(
        prog="python -m model.demo_model",
        description="Train the demo teacher (stage a) and decompose it (stage b) on the synthetic scenes.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=defaults.out_dir,
        help="where teacher/ and decomposed/ go (default %(default)s)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=defaults.data_dir,
        help="synthetic dataset folder, generated if missing (default %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of data, init and training (default %(default)s)",
    )
    parser.add_argument(
        "--teacher-steps",
        type=int,
        default=defaults.teacher_steps,
        help="stage (a) optimizer steps (default %(default)s)",
    )
    parser.add_argument(
        "--decompose-steps",
        type=int,
        default=defaults.decompose_steps,
        help="stage (b) optimizer steps (default %(default)s)",
    )
    parser.add_argument(
        "--negatives",
        choices=("bimodal", "unimodal"),
        default=defaults.negatives,
        help="contrastive negatives of stage (b) (default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: with the image-decoding worker that fills 2 cores; "
        "2 threads ran 5-10x slower on a shared 2-core machine, waiting on each other)",
    )
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="ablation: decompose the random initialisation instead of the teacher",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = DemoModelConfig(
        out_dir=args.out,
        data_dir=args.data,
        seed=args.seed,
        teacher_steps=args.teacher_steps,
        decompose_steps=args.decompose_steps,
        negatives=args.negatives,
        from_scratch=args.from_scratch,
    )
    try:
        record = build_demo_models(config)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
