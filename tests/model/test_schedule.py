"""The warm-up + cosine learning-rate schedule, and rebuilding it when a run resumes."""

from __future__ import annotations

import math

import pytest
import torch

from model.schedule import WarmupCosine, warmup_cosine_scheduler


def test_warmup_then_cosine_to_the_floor() -> None:
    schedule = WarmupCosine(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [schedule(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == pytest.approx(1.0)
    assert schedule(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert schedule(14) == pytest.approx(0.1)
    assert schedule(100) == pytest.approx(0.1)
    decay = [schedule(step) for step in range(4, 15)]
    assert decay == sorted(decay, reverse=True)
    assert schedule(6) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.2)))


def test_no_warmup_starts_at_the_peak() -> None:
    assert WarmupCosine(warmup_steps=0, total_steps=10)(0) == 1.0


@pytest.mark.parametrize(
    ("warmup", "total", "floor"), [(-1, 10, 0.0), (0, 0, 0.0), (0, 10, 1.5), (0, 10, -0.1)]
)
def test_bad_settings_are_rejected(warmup: int, total: int, floor: float) -> None:
    with pytest.raises(ValueError):
        WarmupCosine(warmup, total, floor)


def _optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_rebuilt_scheduler_continues_where_the_stepped_one_is() -> None:
    stepped_optimizer = _optimizer(0.01)
    stepped = warmup_cosine_scheduler(stepped_optimizer, 3, 20, 0.0)
    for _ in range(7):
        stepped_optimizer.step()
        stepped.step()
    rebuilt_optimizer = _optimizer(0.01)
    rebuilt = warmup_cosine_scheduler(rebuilt_optimizer, 3, 20, 0.0, completed_steps=7)
    assert rebuilt.get_last_lr() == pytest.approx(stepped.get_last_lr())
    assert rebuilt_optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * WarmupCosine(3, 20)(7))
