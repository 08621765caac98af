"""Evaluation: the three modes on tiny data, their consistency, folds, and the CLI."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import EarlyInteraction, VLDeformer
from model.eval_scoring import Gallery, early_scores, rerank
from model.evaluate import MODES, build_parser, evaluate, load_gallery, main
from model.images import open_image
from model.metrics import fold_captions, remap_to_fold, retrieval_metrics
from model.synthetic import SyntheticConfig, write_dataset
from tests.model.cli_help import assert_every_option_documented

RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = SyntheticConfig(image_size=32, n_train=4, n_val=4, n_test=6)
    return write_dataset(tmp_path_factory.mktemp("captions"), config)


@pytest.fixture(scope="module")
def gallery(dataset_json: Path) -> tuple[list[Path], list[str], np.ndarray]:
    return load_gallery(dataset_json, "test")


@pytest.fixture(scope="module")
def student(tiny_vilt_dir: Path) -> VLDeformer:
    return VLDeformer.from_pretrained(tiny_vilt_dir, device="cpu")


@pytest.fixture(scope="module")
def teacher(tiny_vilt_dir: Path) -> EarlyInteraction:
    return EarlyInteraction.from_pretrained(tiny_vilt_dir, device="cpu")


def test_cli_runs_all_three_modes(
    tiny_vilt_dir: Path, dataset_json: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    json_path = tmp_path / "results.json"
    argv = [
        "--model", str(tiny_vilt_dir), "--teacher", str(tiny_vilt_dir),
        "--data", str(dataset_json), "--modes", "decomposed,early,hybrid",
        "--protocol", "full", "--rerank-k", "3", "--batch-size", "16",
        "--json", str(json_path), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for mode in MODES:
        assert mode in printed
    assert "speed-up" in printed

    report = json.loads(json_path.read_text())
    assert (report["n_images"], report["n_captions"], report["n_folds"]) == (6, 30, 1)
    assert set(report["results"]) == set(MODES)
    for mode, result in report["results"].items():
        metrics = result["metrics"]
        assert all(0.0 <= metrics[key] <= 100.0 for key in RECALL_KEYS), mode
        assert metrics["rsum"] == pytest.approx(sum(metrics[key] for key in RECALL_KEYS))
        assert result["seconds"] > 0 and result["ms_per_query"] > 0
        assert result["n_queries"] == 6 + 30
    assert report["results"]["decomposed"]["pairs_scored"] == 0
    assert report["results"]["early"]["pairs_scored"] == 6 * 30  # every pair
    # hybrid: at most 3 candidates per image query plus 3 per caption query
    assert 0 < report["results"]["hybrid"]["pairs_scored"] <= 6 * 3 + 30 * 3
    assert set(report["speedups"]) == {
        "_vs_".join(sorted(pair, key=lambda name: report["results"][name]["seconds"]))
        for pair in (("decomposed", "early"), ("decomposed", "hybrid"), ("early", "hybrid"))
    }
    assert all(factor >= 1.0 for factor in report["speedups"].values())


def test_hybrid_reranking_everything_equals_early_interaction(
    student: VLDeformer,
    teacher: EarlyInteraction,
    gallery: tuple[list[Path], list[str], np.ndarray],
) -> None:
    images, captions, caption_to_image = gallery
    report = evaluate(
        student,
        images,
        captions,
        caption_to_image,
        modes=("early", "hybrid"),
        teacher=teacher,
        rerank_k=len(captions),
        batch_size=7,  # batches that do not divide the pair counts
    )
    assert report.results["hybrid"].metrics == report.results["early"].metrics
    assert report.results["hybrid"].pairs_scored == len(images) * len(captions)


def test_hybrid_reranking_one_candidate_equals_decomposed(
    student: VLDeformer,
    teacher: EarlyInteraction,
    gallery: tuple[list[Path], list[str], np.ndarray],
) -> None:
    images, captions, caption_to_image = gallery
    # Precondition: no tie at the top of a row, so "the" decomposed top-1 is well defined.
    vectors = student.encode_images([open_image(p) for p in images])
    sim = vectors @ student.encode_text(captions).T
    for scores in (sim, sim.T):
        top_two = np.sort(scores, axis=1)[:, -2:]
        assert (top_two[:, 1] > top_two[:, 0]).all()
    report = evaluate(
        student,
        images,
        captions,
        caption_to_image,
        modes=("decomposed", "hybrid"),
        teacher=teacher,
        rerank_k=1,
    )
    assert report.results["hybrid"].metrics == report.results["decomposed"].metrics
    assert report.results["decomposed"].metrics == retrieval_metrics(sim, caption_to_image)


def test_early_scores_match_score_pairs(
    teacher: EarlyInteraction, gallery: tuple[list[Path], list[str], np.ndarray]
) -> None:
    images, captions, _ = gallery
    image_indices = np.array([0, 2])
    sim = early_scores(teacher, Gallery(images), image_indices, captions[:9], batch_size=4)
    pil_images = [open_image(images[i]) for i in image_indices]
    for row, image in enumerate(pil_images):
        expected = teacher.score_pairs(captions[:9], [image] * 9)
        np.testing.assert_allclose(sim[row], expected, rtol=1e-5, atol=1e-5)


def test_rerank_puts_candidates_first_and_keeps_ties() -> None:
    decomposed = np.array([[0.9, 0.1, 0.5, 0.3, 0.5]], dtype=np.float32)
    candidates = np.array([[0, 2, 4]])
    rescored = np.array([[1.0, 7.0, 1.0]], dtype=np.float32)  # early prefers item 2
    hybrid = rerank(decomposed, candidates, rescored)[0]
    order = [int(i) for i in np.argsort(-hybrid, kind="stable")]
    assert order[0] == 2
    assert set(order[1:3]) == {0, 4} and hybrid[0] == hybrid[4]  # tied early scores stay tied
    assert order[3:] == [3, 1]  # the rest keeps its decomposed order, below every candidate
    assert hybrid[[0, 2, 4]].min() > hybrid[[1, 3]].max()


def test_rerank_with_a_student_weight_blends_both_orders() -> None:
    decomposed = np.array([[0.9, 0.1, 0.2, 0.3]], dtype=np.float32)
    candidates = np.array([[0, 2, 3]])
    rescored = np.array([[0.0, 1.0, 0.9]], dtype=np.float32)  # early prefers 2, then 3, then 0

    def order(weight: float) -> list[int]:
        hybrid = rerank(decomposed, candidates, rescored, student_weight=weight)[0]
        assert hybrid[[0, 2, 3]].min() > hybrid[1]  # candidates stay above the rest
        return [int(i) for i in np.argsort(-hybrid, kind="stable")[:3]]

    assert order(0.0) == [2, 3, 0]  # the teacher alone
    assert order(100.0) == [0, 3, 2]  # the student dominates: its order among the candidates
    # By hand, z-scores over the candidates (0, 2, 3): teacher (-1.40, 0.81, 0.59), student
    # (1.40, -0.86, -0.54); their sums (0.00, -0.05, 0.05): 3 first, then 0, then 2.
    assert order(1.0) == [3, 0, 2]


class _TableModel(torch.nn.Module):
    """A stand-in encoder: image i is a 1x1 picture coding i, caption c is the text str(c)."""

    def __init__(self, image_vectors: np.ndarray, text_vectors: np.ndarray) -> None:
        super().__init__()
        self.image_vectors = image_vectors
        self.text_vectors = text_vectors
        self.embedding_dim = image_vectors.shape[1]

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        pixels = [image.getpixel((0, 0)) for image in images]
        return self.image_vectors[[red + 256 * green for red, green, _ in pixels]]

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return self.text_vectors[[int(text) for text in texts]]


def test_coco_1k_is_the_mean_of_five_folds() -> None:
    rng = np.random.default_rng(0)
    n_images, dim = 5000, 16
    image_vectors = rng.standard_normal((n_images, dim)).astype(np.float32)
    caption_to_image = np.repeat(np.arange(n_images), 5)
    noise = 2.0 * rng.standard_normal((caption_to_image.size, dim)).astype(np.float32)
    text_vectors = image_vectors[caption_to_image] + noise
    model = _TableModel(image_vectors, text_vectors)
    images = [Image.new("RGB", (1, 1), (i % 256, i // 256, 0)) for i in range(n_images)]
    captions = [str(c) for c in range(caption_to_image.size)]

    one_k = evaluate(model, images, captions, caption_to_image, protocol="1k")  # type: ignore[arg-type]
    assert one_k.n_folds == 5 and one_k.n_images == 5000 and one_k.n_captions == 25000
    expected_folds = []
    for fold in range(5):
        fold_images = np.arange(fold * 1000, (fold + 1) * 1000)
        fold_text = fold_captions(caption_to_image, fold_images)
        sim = image_vectors[fold_images] @ text_vectors[fold_text].T
        mapping = remap_to_fold(caption_to_image[fold_text], fold_images)
        expected_folds.append(retrieval_metrics(sim, mapping))
    result = one_k.results["decomposed"]
    assert result.per_fold == expected_folds
    for key in result.metrics:
        assert result.metrics[key] == pytest.approx(np.mean([f[key] for f in expected_folds]))


def test_evaluate_restores_the_training_mode(
    student: VLDeformer, gallery: tuple[list[Path], list[str], np.ndarray]
) -> None:
    images, captions, caption_to_image = gallery
    student.train()
    try:
        evaluate(student, images[:2], captions[:10], caption_to_image[:10])
        assert student.training
    finally:
        student.eval()


def test_max_images_keeps_the_first_images_and_their_captions(dataset_json: Path) -> None:
    images, captions, caption_to_image = load_gallery(dataset_json, "test", max_images=2)
    full_images, full_captions, _ = load_gallery(dataset_json, "test")
    assert images == full_images[:2]
    assert captions == full_captions[:10]
    assert caption_to_image.tolist() == [0] * 5 + [1] * 5


def test_bad_requests_are_refused(
    student: VLDeformer,
    tiny_vilt_dir: Path,
    dataset_json: Path,
    gallery: tuple[list[Path], list[str], np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    images, captions, caption_to_image = gallery
    with pytest.raises(ValueError, match="early-interaction teacher"):
        evaluate(student, images, captions, caption_to_image, modes=("early",))
    with pytest.raises(ValueError, match="decomposed model"):
        evaluate(None, images, captions, caption_to_image, modes=("hybrid",))
    with pytest.raises(ValueError, match="subset of"):
        evaluate(student, images, captions, caption_to_image, modes=("fast",))

    base = ["--data", str(dataset_json), "--no-progress"]
    assert main([*base, "--model", str(tiny_vilt_dir), "--protocol", "1k"]) == 2
    assert "needs at least 1000 test images, found 6" in capsys.readouterr().err
    assert main([*base, "--modes", "early", "--model", str(tiny_vilt_dir)]) == 2
    assert "need --teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--modes", "decomposed,slow"])
    assert exit_info.value.code == 2


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    names = assert_every_option_documented(build_parser(), main, capsys)
    assert len(names) >= 13
