"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR


@dataclass(frozen=True)
class WarmupCosine:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    ``(step + 1) / warmup_steps`` during warm-up (so the first update is not at lr 0), then
    a half cosine from 1 down to ``min_lr_ratio`` at ``total_steps``, and ``min_lr_ratio``
    after. A frozen dataclass rather than a lambda so ``LambdaLR.state_dict`` can save it.
    """

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    completed_steps: int = 0,
) -> LambdaLR:
    """A ``LambdaLR`` applying :class:`WarmupCosine` to every parameter group.

    The schedule is a pure function of the step, so a resumed run rebuilds it with
    ``completed_steps`` (each group's base rate is its ``initial_lr``, else its ``lr``) instead
    of loading a saved one, and a changed ``total_steps`` takes effect.
    """
    if completed_steps < 0:
        raise ValueError(f"completed_steps must be >= 0, got {completed_steps}")
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    schedule = WarmupCosine(warmup_steps, total_steps, min_lr_ratio)
    return LambdaLR(optimizer, schedule, last_epoch=completed_steps - 1)
