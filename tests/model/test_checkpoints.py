"""Atomic checkpoint directories, finding the newest complete one, pruning, RNG round trip."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from model.atomic import write_atomically
from model.checkpoints import (
    STATE_FILE,
    TrainerState,
    capture_rng,
    latest_checkpoint,
    load_trainer_state,
    prune_checkpoints,
    remove_stale_temporaries,
    restore_rng,
    save_checkpoint,
)


def _write_marker(text: str) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        (directory / "marker.txt").write_text(text)

    return write


def test_write_atomically_replaces_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "final"
    write_atomically(target, _write_marker("one"))
    assert (target / "marker.txt").read_text() == "one"

    def crash(directory: Path) -> None:
        (directory / "marker.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(target, crash)
    assert (target / "marker.txt").read_text() == "one"  # the old one survives intact
    write_atomically(target, _write_marker("two"))
    assert (target / "marker.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporaries left


def _state(step: int) -> TrainerState:
    return TrainerState(
        step=step, optimizer={"state": {}}, best_rsum=None, elapsed_seconds=1.5, rng=capture_rng()
    )


def test_latest_checkpoint_ignores_incomplete_and_temporary_dirs(tmp_path: Path) -> None:
    for step in (2, 10):
        save_checkpoint(tmp_path / f"checkpoint-{step}", lambda d: None, _state(step), {"a": 1})
    (tmp_path / "checkpoint-12").mkdir()  # no trainer state: not complete
    (tmp_path / ".checkpoint-14.tmp-999").mkdir()  # left by a crash
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint-10"
    assert load_trainer_state(latest).step == 10
    remove_stale_temporaries(tmp_path)
    assert not (tmp_path / ".checkpoint-14.tmp-999").exists()
    prune_checkpoints(tmp_path, keep=1)
    assert not (tmp_path / "checkpoint-2").exists()
    assert (tmp_path / "checkpoint-10" / STATE_FILE).is_file()
    assert latest_checkpoint(tmp_path / "checkpoint-12") is None


def test_unreadable_state_names_the_file(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=STATE_FILE):
        load_trainer_state(tmp_path)


def test_rng_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "checkpoint-1", lambda d: None, _state(1), {})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(load_trainer_state(tmp_path / "checkpoint-1").rng)
    assert random.random() == expected[0]
    assert np.random.rand() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])
