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
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.backbone import init_vilt_checkpoint
from model.files import file_sha256
from model.itm import ItmConfig, train_teacher
from model.loss import FALSE_NEGATIVE_MODES
from model.modeling import VLDeformer
from model.synthetic import GENERATOR_VERSION, PRESETS, VOCABULARY, write_dataset
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
    # Stage (a): contrastive + listwise matching (K candidates, the hardest mined by the
    # contrastive similarity) + masked language modelling, on one transformer (model.itm).
    teacher_steps: int = 3500
    teacher_batch_size: int = 32
    teacher_lr: float = 5e-4
    teacher_candidates: int = 6
    teacher_hard_candidates: int = 3
    teacher_temperature: float = 0.05
    # Stage (b): decomposition.
    decompose_steps: int = 3000
    decompose_batch_size: int = 96
    decompose_lr: float = 2e-4
    temperature: float = 0.05
    negatives: str = "bimodal"
    # A partial caption ("a red circle") true of other batch images: another positive of
    # them ("positive"), left out ("mask") or a negative ("keep": the paper's plain loss).
    false_negatives: str = "positive"
    pooling: str = "cls"  # or "mean": the paper's code (mean of all tokens, then tanh)
    from_scratch: bool = False  # ablation: decompose the random initialisation, not the teacher


def write_fingerprints(out_dir: Path) -> dict[str, str]:
    """Record the decomposed model's fingerprint and the teacher's weight hash next to them."""
    fingerprints = {
        "decomposed": VLDeformer.from_pretrained(out_dir / "decomposed", device="cpu").fingerprint,
        "teacher_weights_sha256": file_sha256(out_dir / "teacher" / "model.safetensors"),
    }
    (out_dir / FINGERPRINTS_FILE).write_text(json.dumps(fingerprints, indent=2) + "\n")
    return fingerprints


def init_demo_vilt(config: DemoModelConfig, out_dir: Path) -> Path:
    """A randomly initialised ViLT of the demo's shape and vocabulary (seeded)."""
    return init_vilt_checkpoint(
        out_dir,
        words=VOCABULARY,
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        seed=config.seed,
    )


def _teacher_config(config: DemoModelConfig, init_dir: Path, output_dir: Path) -> ItmConfig:
    return ItmConfig(
        init_model=str(init_dir),
        data=str(config.data_dir / "dataset.json"),
        output_dir=str(output_dir),
        max_steps=config.teacher_steps,
        batch_size=config.teacher_batch_size,
        lr=config.teacher_lr,
        warmup_steps=max(1, config.teacher_steps // 20),
        seed=config.seed,
        candidates=config.teacher_candidates,
        hard_candidates=config.teacher_hard_candidates,
        temperature=config.teacher_temperature,
    )


def build_teacher(config: DemoModelConfig, work_dir: Path, *, progress: bool = True) -> Path:
    """Stage (a): a fresh ViLT trained as an early-interaction teacher → ``out_dir/teacher``.

    Trains under ``work_dir/teacher`` (resumable: an interrupted run continues from its last
    checkpoint) and copies the result into place; a teacher already in place with the same
    settings is kept."""
    target = config.out_dir / "teacher"
    init_dir = init_demo_vilt(config, work_dir / "init")
    expected = _teacher_config(config, init_dir, work_dir / "teacher")
    done = target / "itm_config.json"
    if done.is_file() and json.loads(done.read_text()) == _portable(expected):
        logger.info("stage (a): %s is already trained with these settings", target)
        return target
    trained = train_teacher(expected, resume=True, progress=progress)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(trained, target)
    # The recorded settings name no machine path: the build is reproducible anywhere.
    done.write_text(json.dumps(_portable(expected), indent=2) + "\n")
    return target


def _portable(config: ItmConfig) -> dict[str, object]:
    """The teacher's settings without the paths of this build's work folder."""
    record = dataclasses.asdict(config)
    record.update(init_model="init (model.backbone.init_vilt_checkpoint)", output_dir="teacher")
    record["data"] = Path(record["data"]).name
    record["generator_version"] = GENERATOR_VERSION  # a teacher of an older world is stale
    return record


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
            false_negatives=config.false_negatives,
            pooling=config.pooling,
            eval_every=0,
            save_every=max(1, config.decompose_steps // 4),
            keep_checkpoints=1,
            resume=True,
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


def build_demo_models(
    config: DemoModelConfig, *, fresh: bool = False, progress: bool = True
) -> dict[str, object]:
    """Run both stages; returns timings and fingerprints (also written to ``build.json``).

    Resumable: an interrupted build continues where it stopped (the teacher from its last
    checkpoint, a finished teacher kept, decomposition from its last checkpoint), unless
    ``fresh``, which starts over."""
    started = time.perf_counter()
    # The scenes are drawn at the model's image size: the processor would otherwise resize them.
    world = dataclasses.replace(
        PRESETS[config.preset], seed=config.seed, image_size=config.image_size
    )
    write_dataset(config.data_dir, world)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = config.out_dir.parent / f".work-{config.out_dir.name}"
    settings_file = work_dir / "demo_config.json"
    settings = json.dumps(
        {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}
        | {"generator_version": GENERATOR_VERSION},  # a new world never resumes an old build
        sort_keys=True,
    )
    if fresh or (settings_file.is_file() and settings_file.read_text() != settings):
        shutil.rmtree(work_dir, ignore_errors=True)
        if fresh:
            shutil.rmtree(config.out_dir / "teacher", ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(settings)
    teacher = build_teacher(config, work_dir, progress=progress)
    start = work_dir / "init" if config.from_scratch else teacher
    decompose(config, start, work_dir)
    total_seconds = time.perf_counter() - started
    shutil.rmtree(work_dir, ignore_errors=True)
    fingerprints = write_fingerprints(config.out_dir)
    record = {
        "config": {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()
        },
        # Stage (a)'s training time over all its runs (a resumed build adds up its parts),
        # and this invocation's wall time (data, both stages, fingerprints).
        "teacher_train_seconds": _teacher_train_seconds(teacher),
        "total_seconds_this_run": round(total_seconds, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU'}",
        **fingerprints,
    }
    (config.out_dir / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _teacher_train_seconds(teacher: Path) -> float | None:
    """The last ``elapsed_s`` of the teacher's metrics log (cumulative across resumes)."""
    try:
        lines = (teacher / "itm_metrics.jsonl").read_text().splitlines()
        return float(json.loads(lines[-1])["elapsed_s"])
    except (OSError, IndexError, KeyError, ValueError):
        return None


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
        "--image-size",
        type=int,
        default=defaults.image_size,
        help="side of the scenes and of the model's input, in pixels (default %(default)s: "
        "4x4 patches). Use a --data folder of its own per size. 96 (6x6 patches) lets the "
        "tower learn shapes much sooner (bench/shape_probe.py) at ~1.6x the cost per step",
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
        "--false-negatives",
        choices=FALSE_NEGATIVE_MODES,
        default=defaults.false_negatives,
        help="stage (b): a caption also true of another image of the batch is another "
        "positive of it, left out, or kept a negative (the paper) (default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: with the image-decoding worker that fills 2 cores; "
        "2 threads ran 5-10x slower on a shared 2-core machine, waiting on each other)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over instead of resuming an interrupted build",
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
        image_size=args.image_size,
        teacher_steps=args.teacher_steps,
        decompose_steps=args.decompose_steps,
        negatives=args.negatives,
        false_negatives=args.false_negatives,
        from_scratch=args.from_scratch,
    )
    try:
        record = build_demo_models(config, fresh=args.fresh)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
