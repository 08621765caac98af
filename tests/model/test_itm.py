"""Stage (a), the teacher: candidate mining, the truth mask, the loss, and resumable training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.backbone import init_vilt_checkpoint
from model.itm import (
    CHECKPOINT_DIRNAME,
    ItmConfig,
    pick_candidates,
    teacher_loss,
    train_teacher,
)
from model.modeling import EarlyInteraction, VLDeformer
from model.synthetic import PRESETS, VOCABULARY, write_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_hard_candidates_are_the_most_similar_false_columns() -> None:
    similarity = torch.tensor([[9.0, 8.0, 7.0, 1.0, 0.0, 5.0]])
    truth = torch.tensor([[True, True, False, False, False, False]])  # columns 0, 1 are true
    columns, valid = pick_candidates(similarity, truth, n_hard=2, n_total=4, generator=_generator())
    assert columns[0, :2].tolist() == [2, 5]  # the two most similar false ones, in order
    assert set(columns[0, 2:].tolist()) == {3, 4}  # the rest: random false ones
    assert valid.all()


def test_true_columns_are_never_valid_candidates_and_shortfalls_are_masked() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        similarity = torch.from_numpy(rng.normal(size=(6, 6)))
        truth = torch.from_numpy(rng.random((6, 6)) < 0.5) | torch.eye(6, dtype=torch.bool)
        columns, valid = pick_candidates(similarity, truth, 2, 4, _generator())
        assert columns.shape == valid.shape == (6, 4)
        picked_true = truth.gather(1, columns)
        assert not (picked_true & valid).any()
        for row in range(6):
            chosen = columns[row][valid[row]].tolist()
            assert len(chosen) == len(set(chosen)) == min(4, int((~truth[row]).sum()))


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("itm")
    write_dataset(root / "data", PRESETS["tiny"])
    init = init_vilt_checkpoint(
        root / "init",
        words=VOCABULARY,
        image_size=64,
        patch_size=32,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        seed=0,
    )
    return root / "data" / "dataset.json", init


def test_teacher_loss_has_all_terms_and_ignores_true_pairs(
    tiny_world: tuple[Path, Path],
) -> None:
    data, init = tiny_world
    teacher = EarlyInteraction.from_pretrained(init)
    encoder = VLDeformer(teacher.network.vilt, teacher.tokenizer, teacher.image_processor)
    config = ItmConfig(
        init_model=str(init),
        data=str(data),
        output_dir="unused",
        batch_size=4,
        candidates=3,
        hard_candidates=1,
    )
    texts = ["a red circle", "a blue square", "two shapes", "a green diamond"]
    images = [np.full((64, 64, 3), 40 * i, dtype=np.uint8) for i in range(4)]
    from PIL import Image

    tokens = teacher.tokenize(texts)
    pixel_values, pixel_mask = encoder.preprocess([Image.fromarray(a) for a in images])
    batch = {**tokens, "pixel_values": pixel_values, "pixel_mask": pixel_mask}
    truth = torch.eye(4, dtype=torch.bool)
    losses = teacher_loss(teacher, encoder, batch, truth, config, _generator())
    assert set(losses) == {"contrastive", "matching"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    # Caption 2 true of every image: it has no negative, so its rows drop out of the
    # contrastive loss (a row of one candidate has zero loss) and stay finite.
    truth[2] = True
    masked = teacher_loss(teacher, encoder, batch, truth, config, _generator())
    assert all(torch.isfinite(v) for v in masked.values())
    assert not torch.isclose(masked["contrastive"], losses["contrastive"])
    masked["matching"].backward()  # a finite gradient despite the -inf entries
    grads = [p.grad for p in teacher.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def _config(data: Path, init: Path, out: Path, steps: int) -> ItmConfig:
    return ItmConfig(
        init_model=str(init),
        data=str(data),
        output_dir=str(out),
        max_steps=steps,
        batch_size=8,
        candidates=4,
        hard_candidates=2,
        warmup_steps=1,
        min_lr_ratio=1.0,  # a constant lr: the last step moves weights by ~lr, far above rounding
        num_workers=0,
        save_every=3,
        log_every=1,
    )


def test_an_interrupted_teacher_resumes_to_the_same_weights(
    tiny_world: tuple[Path, Path], tmp_path: Path
) -> None:
    data, init = tiny_world
    straight = train_teacher(_config(data, init, tmp_path / "straight", 7), progress=False)
    # The same run dies right after its step-6 checkpoint (the 40 training images give 5
    # batches an epoch, so the resume lands mid-epoch), then resumes to step 7.
    crash_dir = tmp_path / "crash"
    _run_until_checkpoint(_config(data, init, crash_dir, 7), stop_after=6)
    assert (crash_dir / CHECKPOINT_DIRNAME / "training_state.pt").is_file()
    resumed = train_teacher(_config(data, init, crash_dir, 7), resume=True, progress=False)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    # Equal up to float rounding (~1e-8 here). Skipped: biases that the losses cannot see
    # (the matching bias and attention key biases shift every logit of a softmax equally, so
    # their gradient is rounding noise, which Adam scales up to steps of ~lr).
    invariant = ("rank_output.bias", "attention.key.bias")
    compared = [name for name in a if not name.endswith(invariant)]
    assert len(compared) > 10
    for name in compared:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    steps = [json.loads(line)["step"] for line in (crash_dir / "itm_metrics.jsonl").open()]
    assert steps[-1] == 7 and 7 not in steps[:-1]


class _Stop(Exception):
    pass


def _run_until_checkpoint(config: ItmConfig, stop_after: int) -> None:
    """Train and die right after the checkpoint of step ``stop_after`` is written."""
    import model.itm as itm

    original = itm._save_checkpoint

    def save_then_maybe_die(directory: Path, teacher, state, cfg) -> None:  # type: ignore[no-untyped-def]
        original(directory, teacher, state, cfg)
        if state["step"] >= stop_after:
            raise _Stop

    itm._save_checkpoint = save_then_maybe_die
    try:
        with pytest.raises(_Stop):
            train_teacher(config, progress=False)
    finally:
        itm._save_checkpoint = original


def test_resuming_with_other_settings_is_refused(
    tiny_world: tuple[Path, Path], tmp_path: Path
) -> None:
    data, init = tiny_world
    _run_until_checkpoint(_config(data, init, tmp_path / "run", 7), stop_after=3)
    other = dataclasses.replace(_config(data, init, tmp_path / "run", 7), lr=1e-3)
    with pytest.raises(ValueError, match="other settings"):
        train_teacher(other, resume=True, progress=False)
