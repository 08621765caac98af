"""Training checkpoints on disk: atomic directory writes, the trainer's state, resuming.

A checkpoint directory ``OUT/checkpoint-<step>/`` holds the model
(:meth:`model.VLDeformer.save_pretrained`), ``trainer_state.pt`` (optimizer, step, RNG
states, best validation RSUM, elapsed time) and ``train_config.json``. The learning-rate
schedule is a pure function of the step and the config (:mod:`model.schedule`), so it is
rebuilt on resume rather than saved. Directories
are written under a hidden temporary name and renamed into place, so a crash leaves either
the previous checkpoint or the complete new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.atomic import TEMPORARY_MARK, write_atomically

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete half-written directories left by a crashed run (hidden ``.*.tmp-<pid>``)."""
    for stale in Path(out_dir).glob(f".*{TEMPORARY_MARK}*"):
        if stale.is_dir():
            logger.warning("removing %s, left by an interrupted write", stale)
            shutil.rmtree(stale, ignore_errors=True)


def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-<step>`` directories of ``out_dir`` as ``(step, path)``, by step."""
    found = []
    for path in Path(out_dir).glob("checkpoint-*"):
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of ``out_dir``, or ``None``."""
    found = checkpoint_dirs(out_dir)
    return found[-1][1] if found else None


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoint directories (``keep <= 0``: keep all)."""
    if keep <= 0:
        return
    for _, path in checkpoint_dirs(out_dir)[:-keep]:
        logger.info("removing old checkpoint %s", path)
        shutil.rmtree(path)


@dataclass(frozen=True)
class TrainerState:
    """Everything besides the weights that a resumed run needs to continue identically."""

    step: int
    optimizer: dict[str, Any]
    best_rsum: float | None
    elapsed_seconds: float
    rng: dict[str, Any]


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) global RNG states, in a weights-only-safe form."""
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gauss": float(cached_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(_as_tuples(rng["python"]))
    numpy_state = rng["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gauss"],
        )
    )
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants nested tuples; serialisation may give lists."""
    return tuple(_as_tuples(item) for item in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(
    target: Path,
    save_model: Callable[[Path], object],
    state: TrainerState,
    config: dict[str, Any],
) -> Path:
    """Atomically write model, ``trainer_state.pt`` and ``train_config.json`` to ``target``."""

    def write(directory: Path) -> None:
        save_model(directory)
        torch.save(
            {
                "step": state.step,
                "optimizer": state.optimizer,
                "best_rsum": state.best_rsum,
                "elapsed_seconds": state.elapsed_seconds,
                "rng": state.rng,
            },
            directory / STATE_FILE,
        )
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    return write_atomically(target, write)


def load_trainer_state(checkpoint: Path) -> TrainerState:
    """Read ``trainer_state.pt`` of a checkpoint directory (weights-only unpickling)."""
    path = Path(checkpoint) / STATE_FILE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return TrainerState(
            step=int(saved["step"]),
            optimizer=saved["optimizer"],
            best_rsum=saved["best_rsum"],
            elapsed_seconds=float(saved["elapsed_seconds"]),
            rng=saved["rng"],
        )
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path} is not a readable trainer state: {exc}") from exc
