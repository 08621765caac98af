"""Decomposition training: fine-tune a ViLT into a VLDeformer with the bi-modal contrastive loss.

``python -m model.train --model VILT_DIR --data dataset_coco.json --output-dir runs/coco``

Each step draws a batch of (caption, image) pairs — one caption per image per epoch
(:class:`model.data.OneCaptionPerImageSampler`), so no batch holds two captions of one image —,
encodes texts and images *separately* with the shared transformer and minimises
:class:`model.loss.ContrastiveLoss` with AdamW, linear warm-up then cosine decay, gradient
clipping and, on GPU, bf16 autocast. ``micro_batch_size`` accumulates a large contrastive batch
exactly (GradCache, :func:`model.loss.contrastive_step`).

Output directory::

    OUT/metrics.jsonl           one JSON object per logged step and per validation
    OUT/checkpoint-<step>/      model (VLDeformer.save_pretrained) + trainer_state.pt
                                + train_config.json; the newest ``keep_checkpoints`` are kept
    OUT/best/                   the model with the best validation RSUM (+ val_metrics.json)
    OUT/final/                  the model after the last step: what :func:`train` returns

Every directory is written under a temporary name and renamed into place
(:mod:`model.checkpoints`), so a crash never leaves a half-written checkpoint; ``resume``
continues from the newest ``checkpoint-<step>`` with the same batches, learning rate and RNG.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.atomic import write_atomically
from model.backbone import CheckpointError, resolve_device
from model.checkpoints import (
    CONFIG_FILE,
    TrainerState,
    capture_rng,
    latest_checkpoint,
    load_trainer_state,
    prune_checkpoints,
    remove_stale_temporaries,
    restore_rng,
    save_checkpoint,
)
from model.data import (
    IMAGE_KEYS,
    TEXT_KEYS,
    DatasetFormatError,
    OneCaptionPerImageSampler,
    PairDataset,
    collate_pairs,
    read_pairs,
)
from model.evaluate import evaluate, load_gallery
from model.images import ImageError
from model.loss import ContrastiveLoss, LossFn, contrastive_step
from model.modeling import VLDeformer, autocast
from model.schedule import warmup_cosine_scheduler
from model.train_config import TrainConfig, build_parser, config_from_args
from model.truth import TruthTable

__all__ = ["TrainConfig", "build_parser", "main", "train"]

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
BEST_DIR = "best"


# ------------------------------------------------------------------------- pieces


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases and LayerNorm weights (1-D)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _with_autocast(
    encode: Callable[..., torch.Tensor], device: torch.device
) -> Callable[..., torch.Tensor]:
    """bf16 autocast around an encoder's forward on GPU (its backward then runs outside)."""

    def run(**inputs: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return encode(**inputs).float()

    return run


def epoch_batches(
    sampler: OneCaptionPerImageSampler, epoch: int, batch_size: int, skip: int = 0
) -> list[list[int]]:
    """The epoch's full batches of pair indices (the last partial one dropped), minus the
    first ``skip`` — the batches a resumed run has already trained on."""
    sampler.set_epoch(epoch)
    order = list(sampler)
    n_batches = len(order) // batch_size
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(skip, n_batches)]


class _MetricsLog:
    """Appends one JSON object per line to the metrics file, flushed as it goes."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class _Validation:
    """The validation gallery; :meth:`run` gives its decomposed recalls and wall time."""

    images: list[Path]
    captions: list[str]
    caption_to_image: np.ndarray

    def run(self, model: VLDeformer, batch_size: int) -> tuple[dict[str, float], float]:
        report = evaluate(
            model,
            self.images,
            self.captions,
            self.caption_to_image,
            modes=("decomposed",),
            protocol="full",
            batch_size=batch_size,
        )
        result = report.results["decomposed"]
        return result.metrics, result.seconds


def _load_validation(config: TrainConfig) -> _Validation | None:
    if not config.validates:
        return None
    images, captions, caption_to_image = load_gallery(
        config.val_data_path or config.data_path,
        config.val_split,
        config.val_images_dir or config.images_dir,
        config.val_max_images,
    )
    logger.info("validating on %d images / %d captions", len(images), len(captions))
    return _Validation(images, captions, caption_to_image)


# ------------------------------------------------------------------------- the loop


def train(config: TrainConfig) -> Path:
    """Run the training of ``config``; return the final checkpoint directory ``OUT/final``.

    Raises ``ValueError`` (and its subclasses ``DatasetFormatError``, ``CheckpointError``,
    ``ImageError``) for bad inputs, naming the offending value; ``FloatingPointError`` when
    the loss stops being finite.
    """
    for name in ("model_path", "data_path"):
        if not getattr(config, name).exists():
            raise ValueError(f"{name} {getattr(config, name)} does not exist")
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    resume_from = latest_checkpoint(out)
    if resume_from is not None and not config.resume:
        raise ValueError(
            f"{out} already holds checkpoints (newest {resume_from.name}); pass resume=True "
            "(--resume) to continue, or choose another output directory"
        )
    if config.resume and resume_from is None:
        logger.info("nothing to resume in %s: starting from %s", out, config.model_path)
    device = resolve_device(config.device)
    seed_everything(config.seed)

    model = VLDeformer.from_pretrained(resume_from or config.model_path, device=device)
    settings = dataclasses.replace(model.settings, temperature=config.temperature)
    if config.pooling is not None:
        settings = dataclasses.replace(settings, pooling=config.pooling)
    if config.max_image_patches is not None:
        settings = dataclasses.replace(settings, train_max_image_patches=config.max_image_patches)
    model.settings = settings

    split = config.train_splits or None
    pairs = read_pairs(config.data_path, split=split, images_dir=config.images_dir)
    validation = _load_validation(config)
    dataset = PairDataset(
        pairs, model.tokenizer, model.image_processor, max_text_len=settings.max_text_len
    )
    truth_table = None
    if config.false_negatives != "keep":
        one_split = split[0] if split is not None and len(split) == 1 else None
        truth_table = TruthTable(pairs, config.data_path, one_split)
        logger.info(
            "false negatives: %s, truth from %s",
            config.false_negatives,
            "scene specs" if truth_table.from_scenes else "equal captions / images",
        )
    sampler = OneCaptionPerImageSampler(pairs, seed=config.seed)
    steps_per_epoch = len(sampler) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"{config.data_path} has {len(sampler)} training images, fewer than one batch of "
            f"batch_size={config.batch_size}"
        )
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, fused=device.type == "cuda"
    )
    step, best_rsum, elapsed_before = 0, None, 0.0
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        optimizer.load_state_dict(state.optimizer)
        for group in optimizer.param_groups:  # this run's config sets the schedule
            group["initial_lr"] = config.lr
        restore_rng(state.rng)
        step, best_rsum, elapsed_before = state.step, state.best_rsum, state.elapsed_seconds
        logger.info("resumed from %s at step %d", resume_from, step)
    scheduler = warmup_cosine_scheduler(
        optimizer, config.warmup_steps, total_steps, config.min_lr_ratio, completed_steps=step
    )
    loss_fn = ContrastiveLoss(
        config.temperature,
        config.negatives,  # type: ignore[arg-type]
        config.false_negatives,  # type: ignore[arg-type]
    )
    if step >= total_steps:
        logger.info("step %d already reaches the %d steps of this run", step, total_steps)

    logger.info(
        "training %d steps (%d per epoch) of batch %d on %s; output %s",
        total_steps,
        steps_per_epoch,
        config.batch_size,
        device,
        out,
    )
    run = _Run(config, model, optimizer, scheduler, validation, step, best_rsum, elapsed_before)
    encode_text = _with_autocast(model.encode_tokens, device)
    encode_images = _with_autocast(model.encode_pixels, device)
    collate = functools.partial(collate_pairs, pad_token_id=model.tokenizer.pad_token_id)
    metrics_log = _MetricsLog(config.metrics_path)
    bar = tqdm(total=total_steps, initial=step, disable=not config.progress, unit="step")
    try:
        model.train()
        while run.step < total_steps:
            epoch, done_in_epoch = divmod(run.step, steps_per_epoch)
            batches = epoch_batches(sampler, epoch, config.batch_size, skip=done_in_epoch)
            loader = DataLoader(
                dataset,
                batch_sampler=batches,
                collate_fn=collate,
                num_workers=config.num_workers,
                pin_memory=device.type == "cuda",
            )
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                batch_loss: LossFn = loss_fn
                if truth_table is not None:
                    truth = truth_table.batch(batch["index"].tolist())
                    batch_loss = functools.partial(loss_fn, truth=truth)
                loss = contrastive_step(
                    encode_text,
                    encode_images,
                    {key: batch[key] for key in TEXT_KEYS},
                    {key: batch[key] for key in IMAGE_KEYS},
                    batch_loss,
                    config.micro_batch_size,
                    device=device,
                )
                loss_value = float(loss)
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"the loss is {loss_value} at step {run.step + 1} "
                        f"(lr {scheduler.get_last_lr()[0]:.3g}); lower lr or raise temperature"
                    )
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), config.grad_clip if config.grad_clip > 0 else math.inf
                )
                lr = float(scheduler.get_last_lr()[0])
                if not math.isfinite(float(grad_norm)):  # stop before the weights are poisoned
                    raise FloatingPointError(
                        f"the gradient norm is {float(grad_norm)} at step {run.step + 1} "
                        f"(loss {loss_value:.4g}, lr {lr:.3g})"
                    )
                optimizer.step()
                scheduler.step()
                run.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                run.after_step(metrics_log, epoch, loss_value, lr, float(grad_norm))
                if run.step >= total_steps:
                    break
        final_metrics = run.finish(metrics_log)
    finally:
        bar.close()
        metrics_log.close()
    final = out / FINAL_DIR
    write_atomically(final, functools.partial(_save_model_dir, model, config, final_metrics))
    logger.info("final model in %s (fingerprint %s)", final, model.fingerprint[:12])
    return final


def _save_model_dir(
    model: VLDeformer, config: TrainConfig, val_metrics: dict[str, float] | None, directory: Path
) -> None:
    model.save_pretrained(directory)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if val_metrics is not None:
        (directory / "val_metrics.json").write_text(json.dumps(val_metrics, indent=2) + "\n")


class _Run:
    """The mutable side of a run: step, timing, logging, validation and checkpoints."""

    def __init__(
        self,
        config: TrainConfig,
        model: VLDeformer,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        validation: _Validation | None,
        step: int,
        best_rsum: float | None,
        elapsed_before: float,
    ) -> None:
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.validation = validation
        self.step = step
        self.best_rsum = best_rsum
        self._elapsed_before = elapsed_before
        self._started = time.perf_counter()
        self._losses: list[float] = []
        self._interval_start = time.perf_counter()
        self._last_validated = -1
        self._last_metrics: dict[str, float] | None = None

    @property
    def elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._started

    def after_step(
        self, log: _MetricsLog, epoch: int, loss: float, lr: float, grad_norm: float
    ) -> None:
        config = self.config
        self._losses.append(loss)
        record: dict[str, Any] = {}
        if self.step % config.log_every == 0:
            seconds = time.perf_counter() - self._interval_start
            record = {
                "step": self.step,
                "epoch": epoch,
                "loss": float(np.mean(self._losses)),
                "lr": lr,
                "grad_norm": grad_norm,
                "elapsed_s": round(self.elapsed, 3),
                "pairs_per_s": len(self._losses) * config.batch_size / max(seconds, 1e-9),
            }
            self._losses.clear()
        if self.validation is not None and config.eval_every and self.step % config.eval_every == 0:
            record.update(self._validate())
        if record:
            log.write({"step": self.step, **record})
        if config.save_every and self.step % config.save_every == 0:
            self.save_checkpoint()
        if not self._losses:  # throughput counts training steps only
            self._interval_start = time.perf_counter()

    def finish(self, log: _MetricsLog) -> dict[str, float] | None:
        """Validate after the last step (unless just done); write the last checkpoint."""
        if self.validation is not None and self._last_validated != self.step:
            log.write({"step": self.step, **self._validate()})
        if self.config.save_every and self.step % self.config.save_every != 0:
            self.save_checkpoint()
        return self._last_metrics

    def _validate(self) -> dict[str, Any]:
        assert self.validation is not None
        # Inference needs no contrastive batch: keep forward passes to a training micro-batch.
        batch_size = min(self.config.micro_batch_size or self.config.batch_size, 256)
        metrics, seconds = self.validation.run(self.model, batch_size)
        self._last_validated = self.step
        self._last_metrics = metrics
        logger.info("step %d: val rsum %.2f", self.step, metrics["rsum"])
        if self.best_rsum is None or metrics["rsum"] > self.best_rsum:
            self.best_rsum = metrics["rsum"]
            write_atomically(
                self.config.output_dir / BEST_DIR,
                functools.partial(_save_model_dir, self.model, self.config, metrics),
            )
        return {"val": metrics, "val_seconds": round(seconds, 3), "best_rsum": self.best_rsum}

    def save_checkpoint(self) -> Path:
        state = TrainerState(
            step=self.step,
            optimizer=self.optimizer.state_dict(),
            best_rsum=self.best_rsum,
            elapsed_seconds=self.elapsed,
            rng=capture_rng(),
        )
        target = self.config.output_dir / f"checkpoint-{self.step}"
        save_checkpoint(target, self.model.save_pretrained, state, self.config.to_dict())
        prune_checkpoints(self.config.output_dir, self.config.keep_checkpoints)
        logger.info("saved %s", target)
        return target


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 on success, 2 on bad arguments or inputs, 1 if training diverged."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2
    try:
        final = train(config)
    except (CheckpointError, DatasetFormatError, ImageError, ValueError) as exc:
        print(f"vldeformer-train: error: {exc}", file=sys.stderr)
        return 2
    except (FloatingPointError, OSError) as exc:
        print(f"vldeformer-train: training failed: {exc}", file=sys.stderr)
        return 1
    print(f"final model: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
