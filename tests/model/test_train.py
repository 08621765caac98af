"""Training: the loss goes down, checkpoints round-trip, resume is exact, the CLI is documented."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from model import VLDeformer
from model.checkpoints import STATE_FILE, load_trainer_state
from model.data import PairDataset, collate_pairs, read_pairs
from model.loss import ContrastiveLoss
from model.synthetic import SyntheticConfig, write_dataset
from model.train import TrainConfig, _Run, build_parser, main, train
from tests.model.cli_help import assert_every_option_documented

BATCH = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 8 training images: with batch 8 every step sees the same images (one caption each).
    config = SyntheticConfig(image_size=32, n_train=BATCH, n_val=6, n_test=6)
    return write_dataset(tmp_path_factory.mktemp("captions"), config)


def _config(model: Path, data: Path, out: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "model_path": model,
        "data_path": data,
        "output_dir": out,
        "batch_size": BATCH,
        "max_steps": 6,
        "lr": 1e-3,
        "warmup_steps": 1,
        "temperature": 0.05,
        "eval_every": 3,
        "save_every": 2,
        "log_every": 1,
        "num_workers": 0,
        "progress": False,
    }
    settings.update(overrides)
    return TrainConfig(**settings)


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _fixed_batch_loss(model_dir: Path, dataset_json: Path, temperature: float) -> float:
    """Loss of the first caption of each training image, dropout off."""
    model = VLDeformer.from_pretrained(model_dir, device="cpu")
    pairs = read_pairs(dataset_json, split="train")
    first_caption: dict[Path, int] = {}
    for index, pair in enumerate(pairs):
        first_caption.setdefault(pair.image_path, index)
    dataset = PairDataset(pairs, model.tokenizer, model.image_processor)
    batch = collate_pairs(
        [dataset[i] for i in first_caption.values()], model.tokenizer.pad_token_id
    )
    with torch.no_grad():
        text = model.encode_tokens(batch["input_ids"], batch["attention_mask"])
        image = model.encode_pixels(batch["pixel_values"], batch["pixel_mask"])
        return float(ContrastiveLoss(temperature)(text, image))


@pytest.fixture(scope="module")
def trained_run(
    tiny_vilt_dir: Path, dataset_json: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainConfig, Path]:
    config = _config(tiny_vilt_dir, dataset_json, tmp_path_factory.mktemp("run") / "out")
    return config, train(config)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(
    tiny_vilt_dir: Path, dataset_json: Path, trained_run: tuple[TrainConfig, Path]
) -> None:
    config, final = trained_run
    before = _fixed_batch_loss(tiny_vilt_dir, dataset_json, config.temperature)
    after = _fixed_batch_loss(final, dataset_json, config.temperature)
    assert math.isfinite(after)
    assert after < 0.5 * before, (before, after)


def test_run_directory_layout_and_metrics_log(trained_run: tuple[TrainConfig, Path]) -> None:
    config, final = trained_run
    out = config.output_dir
    assert final == out / "final"
    # save_every=2 over 6 steps, the newest keep_checkpoints=2 kept
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not list(out.glob(".*"))  # no temporary directories left behind
    for directory in (final, out / "best", out / "checkpoint-6"):
        assert (directory / "vldeformer.json").is_file()
        saved = json.loads((directory / "train_config.json").read_text())
        assert TrainConfig.from_dict(saved) == config
    assert load_trainer_state(out / "checkpoint-6").step == 6

    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in records)
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(config.lr)  # warm-up of one step, then cosine decay
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[1]
    validated = [r for r in records if "val" in r]
    assert [r["step"] for r in validated] == [3, 6]
    for record in validated:
        assert set(record["val"]) >= {"i2t_r1", "t2i_r10", "rsum"}
        assert all(0.0 <= value <= 100.0 for key, value in record["val"].items() if key != "rsum")
    best_rsum = max(r["val"]["rsum"] for r in validated)
    best_metrics = json.loads((out / "best" / "val_metrics.json").read_text())
    assert best_metrics["rsum"] == best_rsum
    assert json.loads((final / "vldeformer.json").read_text())["settings"]["temperature"] == 0.05


def test_checkpoint_round_trip_keeps_the_fingerprint(
    tiny_vilt_dir: Path, trained_run: tuple[TrainConfig, Path], tmp_path: Path
) -> None:
    config, final = trained_run
    recorded = json.loads((final / "vldeformer.json").read_text())["fingerprint"]
    loaded = VLDeformer.from_pretrained(final, device="cpu")
    assert loaded.fingerprint == recorded
    resaved = loaded.save_pretrained(tmp_path / "again")
    assert VLDeformer.from_pretrained(resaved, device="cpu").fingerprint == recorded
    # The last checkpoint holds the same weights as the final model; training changed them.
    last = VLDeformer.from_pretrained(config.output_dir / "checkpoint-6", device="cpu")
    assert last.fingerprint == recorded
    assert VLDeformer.from_pretrained(tiny_vilt_dir, device="cpu").fingerprint != recorded


def test_resume_continues_from_the_saved_step(
    tiny_vilt_dir: Path, dataset_json: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = {"val_split": None, "eval_every": 0, "max_steps": 5, "keep_checkpoints": 0}
    straight = train(_config(tiny_vilt_dir, dataset_json, tmp_path / "straight", **overrides))

    interrupted = _config(tiny_vilt_dir, dataset_json, tmp_path / "interrupted", **overrides)
    save = _Run.save_checkpoint

    def save_then_crash(run: _Run) -> Path:
        path = save(run)
        if run.step == 2:
            raise KeyboardInterrupt("simulated crash after the step-2 checkpoint")
        return path

    monkeypatch.setattr(_Run, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted)
    monkeypatch.undo()
    assert [p.name for p in interrupted.output_dir.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (interrupted.output_dir / "final").exists()

    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(interrupted)  # a fresh start would overwrite the run

    resumed = train(TrainConfig.from_dict({**interrupted.to_dict(), "resume": True}))
    steps = [r["step"] for r in _metrics(interrupted.output_dir)]
    assert steps == [1, 2, 3, 4, 5]  # continued at step 3, nothing trained twice
    assert load_trainer_state(interrupted.output_dir / "checkpoint-4").step == 4
    # Same batches, learning rates and optimizer moments as the uninterrupted run.
    straight_model = VLDeformer.from_pretrained(straight, device="cpu")
    assert VLDeformer.from_pretrained(resumed, device="cpu").fingerprint == (
        straight_model.fingerprint
    )
    straight_losses = [r["loss"] for r in _metrics(tmp_path / "straight")]
    resumed_losses = [r["loss"] for r in _metrics(interrupted.output_dir)]
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-6)


def test_micro_batches_train_like_the_full_batch(
    tiny_vilt_dir: Path, dataset_json: Path, tmp_path: Path
) -> None:
    overrides = {"val_split": None, "eval_every": 0, "save_every": 0, "max_steps": 3}
    full = _config(tiny_vilt_dir, dataset_json, tmp_path / "full", **overrides)
    micro = _config(
        tiny_vilt_dir, dataset_json, tmp_path / "micro", micro_batch_size=3, **overrides
    )
    train(full)
    train(micro)
    assert not list(micro.output_dir.glob("checkpoint-*"))  # save_every=0: final model only
    full_losses = [r["loss"] for r in _metrics(full.output_dir)]
    micro_losses = [r["loss"] for r in _metrics(micro.output_dir)]
    assert micro_losses == pytest.approx(full_losses, rel=1e-4)


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    names = assert_every_option_documented(build_parser(), main, capsys)
    assert len(names) > 25


def test_every_config_field_has_an_option() -> None:
    parser = build_parser()
    destinations = {action.dest for action in parser._actions}
    renamed = {
        "model_path": "model",
        "data_path": "data",
        "train_splits": "train_split",
        "val_data_path": "val_data",
        "progress": "no_progress",
    }
    for field in TrainConfig.__dataclass_fields__:
        assert renamed.get(field, field) in destinations, field


def test_cli_reports_bad_inputs(
    tiny_vilt_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.json"
    code = main(
        ["--model", str(tiny_vilt_dir), "--data", str(missing), "--output-dir", str(tmp_path)]
    )
    assert code == 2
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "m", "--data", "d", "--output-dir", "o", "--batch-size", "1"])
    assert exit_info.value.code == 2
    assert "batch_size must be >= 2" in capsys.readouterr().err


def test_cli_trains(tiny_vilt_dir: Path, dataset_json: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    argv = [
        "--model", str(tiny_vilt_dir), "--data", str(dataset_json), "--output-dir", str(out),
        "--max-steps", "2", "--batch-size", "4", "--val-split", "none", "--save-every", "1",
        "--num-workers", "0", "--no-progress", "--temperature", "0.05",
    ]  # fmt: skip
    assert main(argv) == 0
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "checkpoint-2" / STATE_FILE).is_file()
    saved = TrainConfig.from_dict(json.loads((out / "final" / "train_config.json").read_text()))
    assert saved.batch_size == 4 and saved.val_split is None and saved.max_steps == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 1}, "batch_size"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"negatives": "trimodal"}, "negatives"),
        ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
        ({"max_steps": 0}, "max_steps"),
        ({"max_image_patches": 0}, "max_image_patches"),
        ({"pooling": "max"}, "pooling"),
        ({"false_negatives": "drop"}, "false_negatives"),
    ],
)
def test_config_rejects_bad_values(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(Path("m"), Path("d"), Path("o"), **overrides)


def test_config_dict_round_trip() -> None:
    config = _config(Path("m"), Path("d"), Path("o"), train_splits=("train", "restval"))
    data = json.loads(json.dumps(config.to_dict()))
    assert TrainConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_dict({**data, "learning_rate": 1.0})


def test_a_diverging_run_stops_with_exit_code_1(
    tiny_vilt_dir: Path, dataset_json: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--model", str(tiny_vilt_dir), "--data", str(dataset_json),
        "--output-dir", str(tmp_path / "nan"), "--max-steps", "2", "--batch-size", "4",
        "--val-split", "none", "--num-workers", "0", "--no-progress",
        "--temperature", "1e-45",  # similarities / 1e-45 overflow float32: the loss is not finite
    ]  # fmt: skip
    assert main(argv) == 1
    assert "at step 1" in capsys.readouterr().err
    assert not (tmp_path / "nan" / "final").exists()


def test_pooling_option_reaches_the_saved_model(
    tiny_vilt_dir: Path, dataset_json: Path, tmp_path: Path
) -> None:
    final = train(
        _config(
            tiny_vilt_dir, dataset_json, tmp_path / "run", max_steps=1, eval_every=0, pooling="mean"
        )
    )
    model = VLDeformer.from_pretrained(final)
    assert model.settings.pooling == "mean"
    assert VLDeformer.from_pretrained(tiny_vilt_dir).settings.pooling == "cls"


def _first_step_loss(model: Path, data: Path, out: Path, false_negatives: str) -> float:
    config = _config(
        model,
        data,
        out,
        max_steps=1,
        batch_size=4,
        val_split=None,
        train_splits=(),
        false_negatives=false_negatives,
    )
    train(config)
    return float(_metrics(out)[0]["loss"])


@pytest.mark.parametrize("shared", [True, False])
def test_identical_captions_are_false_negatives_only_when_asked(
    tiny_vilt_dir: Path, tmp_path: Path, shared: bool
) -> None:
    # Four images; with ``shared`` two of them carry the same caption, which is then true of
    # both: "positive" and "mask" stop pushing that pair apart, "keep" (the paper's loss) does.
    lines = []
    for i, colour in enumerate(("red", "blue", "green", "black")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
        caption = "a square" if shared and i < 2 else f"a {colour} square"
        lines.append(json.dumps({"image": f"{i}.png", "caption": caption}))
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    kept = _first_step_loss(tiny_vilt_dir, data, tmp_path / "keep", "keep")
    for mode in ("positive", "mask"):
        loss = _first_step_loss(tiny_vilt_dir, data, tmp_path / mode, mode)
        if shared:
            assert loss < kept - 1e-4, (mode, loss, kept)
        else:
            assert loss == pytest.approx(kept, abs=1e-6), mode
