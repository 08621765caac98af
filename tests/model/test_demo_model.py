"""The paper's two stages end to end on tiny data, and the committed demo models as a guard."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest

from model import EarlyInteraction, VLDeformer
from model.data import group_by_image, read_pairs
from model.demo_model import FINGERPRINTS_FILE, DemoModelConfig, build_demo_models
from model.evaluate import evaluate
from model.files import file_sha256
from model.images import open_image
from model.metrics import ranking_metrics
from model.queries import benchmark_queries, matches, phrase
from model.synthetic import PRESETS, read_examples, write_dataset

DEMO = Path(__file__).resolve().parents[2] / "model" / "assets" / "demo"


def test_both_stages_and_the_evaluator_run_on_tiny_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = DemoModelConfig(
        out_dir=tmp_path / "demo",
        data_dir=tmp_path / "data",
        preset="tiny",
        image_size=64,
        patch_size=16,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        teacher_steps=3,
        teacher_batch_size=8,
        decompose_steps=3,
        decompose_batch_size=8,
    )
    record = build_demo_models(config)
    for name in (
        "teacher/model.safetensors",
        "decomposed/vldeformer.json",
        "build.json",
        FINGERPRINTS_FILE,
    ):
        assert (config.out_dir / name).is_file(), name
    model = VLDeformer.from_pretrained(config.out_dir / "decomposed")
    assert record["decomposed"] == model.fingerprint
    teacher = EarlyInteraction.from_pretrained(config.out_dir / "teacher")

    images, captions, caption_to_image = group_by_image(
        read_pairs(config.data_dir / "dataset.json", split="test")
    )
    report = evaluate(
        model,
        images,
        captions,
        caption_to_image,
        modes=("decomposed", "early", "hybrid"),
        teacher=teacher,
        rerank_k=4,
    )
    assert set(report.results) == {"decomposed", "early", "hybrid"}
    for result in report.results.values():
        assert all(0.0 <= value <= 100.0 for key, value in result.metrics.items() if key != "rsum")
        assert 0.0 <= result.metrics["rsum"] <= 600.0 and result.seconds > 0
    assert report.results["early"].pairs_scored == len(images) * len(captions)
    assert "/" not in json.dumps(
        json.loads((config.out_dir / "teacher" / "itm_config.json").read_text())
    )

    # A rebuild with the same settings keeps the trained teacher (stage a is the long one)...
    import model.demo_model as demo_model

    calls: list[object] = []

    def no_training(*args: object, **kwargs: object) -> Path:
        calls.append(args)
        raise AssertionError("stage (a) ran again")

    monkeypatch.setattr(demo_model, "train_teacher", no_training)
    again = build_demo_models(config)
    assert again["teacher_weights_sha256"] == record["teacher_weights_sha256"] and not calls
    # ...and other teacher settings retrain it.
    with pytest.raises(AssertionError, match="ran again"):
        build_demo_models(dataclasses.replace(config, teacher_steps=4))


def _demo_present() -> bool:
    return (DEMO / "decomposed" / "config.json").is_file() and (DEMO / FINGERPRINTS_FILE).is_file()


@pytest.mark.skipif(not _demo_present(), reason="the demo models are not built (make demo-model)")
def test_committed_demo_models_match_their_recorded_fingerprints() -> None:
    recorded = json.loads((DEMO / FINGERPRINTS_FILE).read_text())
    assert VLDeformer.from_pretrained(DEMO / "decomposed").fingerprint == recorded["decomposed"]
    assert file_sha256(DEMO / "teacher" / "model.safetensors") == recorded["teacher_weights_sha256"]
    EarlyInteraction.from_pretrained(DEMO / "teacher")  # has its retrieval head


# Regression floor for the demo model: text→image R@10 over the first 200 test images of the
# demo split (1,000 captions). The committed model (world v3) measured 100.0 there (R@1 94.0); 95
# leaves room for float noise across machines while a real regression (tokenizer, pooling,
# image preprocessing) falls far below it.
DEMO_T2I_R10_FLOOR = 95.0
DEMO_T2I_R1_FLOOR = 88.0  # measured 94.0; R@1 is what a binding or ranking regression hits first


@pytest.fixture(scope="module")
def demo_test_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's ``dataset.json``, test split only (splits draw from their own random
    streams, so it is the demo's test split without its train/val); written once."""
    root = tmp_path_factory.mktemp("demo-test")
    return write_dataset(root, dataclasses.replace(PRESETS["demo"], n_train=0, n_val=0))


@pytest.mark.skipif(not _demo_present(), reason="the demo models are not built (make demo-model)")
def test_demo_model_recall_stays_above_its_floor(demo_test_split: Path) -> None:
    pairs = read_pairs(demo_test_split, split="test")
    images, captions, caption_to_image = group_by_image(pairs)
    keep = np.flatnonzero(caption_to_image < 200)
    model = VLDeformer.from_pretrained(DEMO / "decomposed")
    report = evaluate(model, images[:200], [captions[i] for i in keep], caption_to_image[keep])
    metrics = report.results["decomposed"].metrics
    assert metrics["t2i_r10"] >= DEMO_T2I_R10_FLOOR
    assert metrics["t2i_r1"] >= DEMO_T2I_R1_FLOOR


# Regression floor for what a person types: precision@10 of the 32 colour+shape queries ("a red
# circle", in a phrasing the training captions use) over the 1,000 demo test images, relevance
# from the scene specs (bench/query_bench.py's "decomposed, 1000 images" cell, which the served
# demo returns). The committed model measured 1.00; the floor is the product's target (issue 9).
DEMO_COLOUR_SHAPE_P10_FLOOR = 0.9


@pytest.mark.skipif(not _demo_present(), reason="the demo models are not built (make demo-model)")
def test_demo_model_finds_a_red_circle(demo_test_split: Path) -> None:
    examples = [ex for ex in read_examples(demo_test_split) if ex.split == "test"]
    model = VLDeformer.from_pretrained(DEMO / "decomposed")
    folder = demo_test_split.parent / "images"
    images = model.encode_images([open_image(folder / ex.filename) for ex in examples])
    rng = random.Random(0)
    queries = [query for category, query in benchmark_queries() if category == "colour+shape"]
    texts = [phrase(query, rng) for query in queries]
    relevant = np.array([[matches(query, ex.scene) for ex in examples] for query in queries])
    metrics = ranking_metrics(model.encode_text(texts) @ images.T, relevant, k=10)
    assert len(queries) == 32 and metrics["queries"] == 32
    assert metrics["p@10"] >= DEMO_COLOUR_SHAPE_P10_FLOOR, (metrics, texts[:3])
