"""The training run's settings: :class:`TrainConfig`, and how the command line maps onto it.

One frozen dataclass holds every setting; it is saved as ``train_config.json`` next to each
checkpoint and read back with :meth:`TrainConfig.from_dict`. :func:`build_parser` documents
each option and :func:`config_from_args` is the only place a parsed ``argparse.Namespace``
becomes a config.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.loss import FALSE_NEGATIVE_MODES, NEGATIVE_MODES

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; saved as ``train_config.json`` in each checkpoint."""

    model_path: Path  # plain ViLT checkpoint (start of decomposition) or a VLDeformer one
    data_path: Path  # Karpathy dataset_*.json, COCO captions_*.json or JSONL
    output_dir: Path
    images_dir: Path | None = None  # image paths are relative to it (default: data file's dir)
    # Karpathy COCO trains on ("train", "restval"); () reads every record (COCO captions files).
    train_splits: tuple[str, ...] = ("train",)
    val_split: str | None = "val"  # None and no val_data_path: no validation
    val_data_path: Path | None = None  # default: data_path (COCO: the captions_val file)
    val_images_dir: Path | None = None  # default: images_dir
    val_max_images: int = 1000  # validate on the first N images, protocol "full"
    epochs: int = 10  # an epoch is one caption of every training image
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 128  # pairs per optimizer step (the contrastive batch)
    micro_batch_size: int | None = None  # GradCache micro-batches; None: the whole batch at once
    lr: float = 2e-5
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    warmup_steps: int = 500
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    temperature: float = 0.005  # the paper's code; saved into the model's DecomposeSettings
    negatives: str = "bimodal"  # or "unimodal" (plain InfoNCE, the ablation)
    # A caption true of another image of the batch (model.truth): "positive" pulls them
    # together, "mask" leaves the pair out, "keep" makes it a negative (the paper's plain loss).
    false_negatives: str = "positive"
    pooling: str | None = None  # "cls" / "mean" (the paper's code); None: the model's own
    max_image_patches: int | None = None  # patches sampled per training image; None: the model's
    eval_every: int = 1000  # steps between validations; 0: only after the last step
    save_every: int = 1000  # steps between checkpoints; 0: only the final model
    keep_checkpoints: int = 2  # newest checkpoint-<step> dirs kept; 0 keeps all
    log_every: int = 10  # steps between metrics.jsonl lines
    seed: int = 0
    device: str = "auto"  # auto: CUDA when available
    num_workers: int = 2  # DataLoader decoding processes; 0 decodes in the main process
    metrics_file: Path | None = None  # default: OUT/metrics.jsonl
    resume: bool = False  # continue from the newest checkpoint in output_dir
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        for name in ("model_path", "data_path", "output_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        for name in ("images_dir", "val_data_path", "val_images_dir", "metrics_file"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "train_splits", tuple(self.train_splits))
        positive: dict[str, float] = {
            "batch_size": self.batch_size,
            "val_max_images": self.val_max_images,
        }
        non_negative: dict[str, float] = {
            "epochs": self.epochs,
            "warmup_steps": self.warmup_steps,
            "eval_every": self.eval_every,
            "save_every": self.save_every,
            "keep_checkpoints": self.keep_checkpoints,
            "num_workers": self.num_workers,
            "weight_decay": self.weight_decay,
            "grad_clip": self.grad_clip,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.max_steps is None and self.epochs < 1:
            raise ValueError(f"set epochs >= 1 or max_steps, got epochs={self.epochs}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.pooling not in (None, "cls", "mean"):
            raise ValueError(f"pooling must be 'cls', 'mean' or None, got {self.pooling!r}")
        if self.false_negatives not in FALSE_NEGATIVE_MODES:
            raise ValueError(
                f"false_negatives must be one of {FALSE_NEGATIVE_MODES}, "
                f"got {self.false_negatives!r}"
            )
        if self.negatives not in NEGATIVE_MODES:
            raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {self.negatives!r}")
        patches = self.max_image_patches
        if patches is not None and patches < 1 and patches != -1:
            raise ValueError(f"max_image_patches must be >= 1, -1 (all) or None, got {patches}")

    @property
    def validates(self) -> bool:
        return self.val_split is not None or self.val_data_path is not None

    @property
    def metrics_path(self) -> Path:
        return self.metrics_file or self.output_dir / METRICS_FILE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, tuples as lists."""
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
            elif isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**data)


# ------------------------------------------------------------------------- command line


def _splits(text: str) -> tuple[str, ...]:
    return () if text.lower() == "none" else tuple(s.strip() for s in text.split(",") if s.strip())


def _optional_str(text: str) -> str | None:
    return None if text.lower() == "none" else text


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only: not ``None``/``False``, nor where the help already says one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig(Path("."), Path("."), Path("."))
    parser = argparse.ArgumentParser(
        prog="vldeformer-train",
        description="Decompose a ViLT into independent image and text encoders (VLDeformer) "
        "with the bi-modal contrastive loss.",
        formatter_class=_HelpFormatter,
    )
    data = parser.add_argument_group("model and data")
    data.add_argument(
        "--model",
        type=Path,
        required=True,
        help="ViLT checkpoint dir to decompose, or a VLDeformer checkpoint to continue",
    )
    data.add_argument(
        "--data",
        type=Path,
        required=True,
        help="captions: Karpathy dataset_*.json, COCO captions_*.json or JSONL",
    )
    data.add_argument(
        "--output-dir",
        type=Path,
        required=True,
        help="run directory: checkpoint-<step>/, best/, final/, metrics.jsonl",
    )
    data.add_argument(
        "--images-dir",
        type=Path,
        help="folder image paths are relative to (default: the data file's folder)",
    )
    data.add_argument(
        "--train-split",
        type=_splits,
        default=",".join(defaults.train_splits),  # argparse runs _splits on it
        help="comma-separated training splits (Karpathy COCO: train,restval); 'none' = all",
    )
    data.add_argument(
        "--val-split",
        type=_optional_str,
        default=defaults.val_split,
        help="validation split; 'none' disables validation unless --val-data is given",
    )
    data.add_argument("--val-data", type=Path, help="validation caption file (default: --data)")
    data.add_argument(
        "--val-images-dir", type=Path, help="image folder of --val-data (default: --images-dir)"
    )
    data.add_argument(
        "--val-max-images",
        type=int,
        default=defaults.val_max_images,
        help="validate on the first N validation images (and their captions)",
    )
    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--epochs",
        type=int,
        default=defaults.epochs,
        help="epochs; each is one caption of every training image",
    )
    optim.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    optim.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="pairs per optimizer step"
    )
    optim.add_argument(
        "--micro-batch-size",
        type=int,
        help="pairs per forward pass with exact contrastive accumulation (GradCache); "
        "default: the whole batch",
    )
    optim.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (AdamW)")
    optim.add_argument(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help="AdamW weight decay (not on biases / LayerNorm)",
    )
    optim.add_argument(
        "--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warm-up steps"
    )
    optim.add_argument(
        "--min-lr-ratio",
        type=float,
        default=defaults.min_lr_ratio,
        help="the cosine decays to lr * this ratio",
    )
    optim.add_argument(
        "--grad-clip",
        type=float,
        default=defaults.grad_clip,
        help="max global gradient norm; 0 disables clipping",
    )
    optim.add_argument(
        "--temperature",
        type=float,
        default=defaults.temperature,
        help="contrastive temperature (the paper's code: 0.005)",
    )
    optim.add_argument(
        "--pooling",
        choices=("cls", "mean"),
        default=None,
        help="how an encoder pools its tokens into one vector: cls = the first token through "
        "ViLT's pooler (dense + tanh); mean = the mean of all tokens, then tanh (the paper's "
        "code). Default: the starting checkpoint's (cls for a plain ViLT)",
    )
    optim.add_argument(
        "--negatives",
        choices=NEGATIVE_MODES,
        default=defaults.negatives,
        help="bimodal: texts and images of the batch are negatives (the paper); "
        "unimodal: the other modality only (InfoNCE)",
    )
    optim.add_argument(
        "--false-negatives",
        choices=FALSE_NEGATIVE_MODES,
        default=defaults.false_negatives,
        help="a caption that is also true of another image of the batch (a partial caption "
        "of the synthetic scenes, by their specs; elsewhere an identical caption or image): "
        "positive = another positive of it (default), mask = left out, keep = a negative "
        "like every other item (the paper's plain in-batch loss)",
    )
    optim.add_argument(
        "--max-image-patches",
        type=int,
        help="patches sampled per training image (ViLT pretraining: 200; -1 all); "
        "default: the model's setting",
    )
    optim.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    run = parser.add_argument_group("run")
    run.add_argument(
        "--eval-every",
        type=int,
        default=defaults.eval_every,
        help="steps between validations; 0: only after the last step",
    )
    run.add_argument(
        "--save-every",
        type=int,
        default=defaults.save_every,
        help="steps between checkpoints; 0: only the final model",
    )
    run.add_argument(
        "--keep-checkpoints",
        type=int,
        default=defaults.keep_checkpoints,
        help="newest checkpoint-<step> dirs to keep; 0 keeps all",
    )
    run.add_argument(
        "--log-every",
        type=int,
        default=defaults.log_every,
        help="steps between lines of the metrics log",
    )
    run.add_argument(
        "--metrics-file", type=Path, help="JSON-lines metrics log (default: OUT/metrics.jsonl)"
    )
    run.add_argument(
        "--device", default=defaults.device, help="torch device: auto, cpu, cuda, cuda:1"
    )
    run.add_argument(
        "--num-workers",
        type=int,
        default=defaults.num_workers,
        help="image decoding worker processes (0: in the main process)",
    )
    run.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in OUT"
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The one place the parsed arguments become a :class:`TrainConfig`."""
    return TrainConfig(
        model_path=args.model,
        data_path=args.data,
        output_dir=args.output_dir,
        images_dir=args.images_dir,
        train_splits=args.train_split,
        val_split=args.val_split,
        val_data_path=args.val_data,
        val_images_dir=args.val_images_dir,
        val_max_images=args.val_max_images,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio,
        grad_clip=args.grad_clip,
        temperature=args.temperature,
        negatives=args.negatives,
        false_negatives=args.false_negatives,
        pooling=args.pooling,
        max_image_patches=args.max_image_patches,
        eval_every=args.eval_every,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every,
        seed=args.seed,
        device=args.device,
        num_workers=args.num_workers,
        metrics_file=args.metrics_file,
        resume=args.resume,
        progress=not args.no_progress,
    )
