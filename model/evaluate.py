"""Retrieval evaluation: decomposed vs early-interaction vs hybrid, with recall and wall time.

``python -m model.evaluate --model DIR --teacher DIR --data dataset_coco.json`` runs the standard
protocol (:mod:`model.metrics`: R@1/5/10 both ways, RSUM, 5 captions per image; COCO 1K as the
mean of 5 folds, COCO 5K, Flickr30k 1K) in up to three modes:

- ``decomposed``: every image and caption encoded once, alone (:class:`model.VLDeformer`, or
  the same model in another encoder runtime of :mod:`model.runtime`: ``--runtime onnx``);
  scores are dot products of the unit vectors.
- ``early``: the undecomposed ViLT (:class:`model.EarlyInteraction`) scores *every* image-caption
  pair of a fold with a joint forward pass — the paper's baseline, ``n_images * n_captions``
  passes. ``--max-images`` evaluates a subset.
- ``hybrid``: the decomposed top ``rerank_k`` candidates of every query re-scored by early
  interaction. Candidates are ranked above all other items by their early-interaction score
  (plus, with ``student_weight`` > 0, that weight times the decomposed score, both z-scored
  over the candidates); the rest keep their decomposed order.

Wall time covers model work only (preprocessing, tokenising, forward passes, similarity,
top-K); decoding image files is timed apart (``decode_seconds``). Hybrid's time includes the
decomposed encoding it builds on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.backbone import CheckpointError
from model.data import DatasetFormatError, group_by_image, read_pairs
from model.eval_scoring import Gallery, Stopwatch, early_scores, encode_gallery, hybrid_scores
from model.images import ImageError
from model.metrics import (
    METRIC_KEYS,
    PROTOCOLS,
    check_caption_to_image,
    fold_captions,
    mean_metrics,
    protocol_folds,
    remap_to_fold,
    retrieval_metrics,
)
from model.modeling import EarlyInteraction, VLDeformer
from model.runtime import RUNTIMES, RuntimeEncoder, load_encoder

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("decomposed", "early", "hybrid")
_NEEDS_STUDENT = frozenset({"decomposed", "hybrid"})
_NEEDS_TEACHER = frozenset({"early", "hybrid"})


# ------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ModeResult:
    """One mode's recalls and cost.

    ``metrics``: the mean over folds (keys of :data:`model.metrics.METRIC_KEYS`, percent);
    ``seconds``: model wall time over all folds; ``n_queries``: image plus caption queries
    over all folds; ``pairs_scored``: joint (early-interaction) forward passes.
    """

    mode: str
    metrics: dict[str, float]
    per_fold: list[dict[str, float]]
    seconds: float
    n_queries: int
    pairs_scored: int
    # Text→image scores (n_captions, n_images) of each fold, when evaluate(keep_scores=True).
    t2i_scores: list[np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def ms_per_query(self) -> float:
        return 1000.0 * self.seconds / max(1, self.n_queries)


@dataclass(frozen=True)
class EvaluationReport:
    """Everything :func:`evaluate` measured; :meth:`to_dict` is what ``--json`` writes."""

    protocol: str
    n_images: int
    n_captions: int
    n_folds: int
    rerank_k: int
    results: dict[str, ModeResult]
    decode_seconds: float
    speedups: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for mode, result in self.results.items():
            data["results"][mode]["ms_per_query"] = result.ms_per_query
            data["results"][mode].pop("t2i_scores", None)
        return data


def speedups(results: dict[str, ModeResult]) -> dict[str, float]:
    """``"a_vs_b"``: how many times less wall time mode ``a`` took than mode ``b``."""
    ordered = [mode for mode in MODES if mode in results]
    out: dict[str, float] = {}
    for i, fast in enumerate(ordered):
        for slow in ordered[i + 1 :]:
            fast_seconds, slow_seconds = results[fast].seconds, results[slow].seconds
            if fast_seconds > slow_seconds:
                fast, slow, fast_seconds, slow_seconds = slow, fast, slow_seconds, fast_seconds
            out[f"{fast}_vs_{slow}"] = slow_seconds / max(fast_seconds, 1e-9)
    return out


# ------------------------------------------------------------------------- driver


def evaluate(
    model: VLDeformer | RuntimeEncoder | None,
    images: Sequence[Image.Image | str | Path],
    captions: Sequence[str],
    caption_to_image: np.ndarray,
    *,
    modes: Sequence[str] = ("decomposed",),
    teacher: EarlyInteraction | None = None,
    protocol: str = "full",
    rerank_k: int = 16,
    batch_size: int = 64,
    progress: bool = False,
    keep_scores: bool = False,
    student_weight: float = 0.0,
) -> EvaluationReport:
    """Evaluate retrieval on a gallery in the given modes.

    Args:
        model: the decomposed model (needed by ``decomposed`` and ``hybrid``), or an encoder
            runtime of it (:func:`model.runtime.load_encoder`). Torch modules (it and the
            teacher) run in ``eval()`` mode (no dropout) and get their own mode back after.
        images: ``n_images`` PIL images or image files (decoded on demand, one batch at a time).
        captions: ``n_captions`` captions; ``caption_to_image[c]`` is caption ``c``'s image index
            (:func:`model.data.group_by_image` gives all three).
        modes: a subset of :data:`MODES`, run in that order.
        teacher: the early-interaction ViLT (needed by ``early`` and ``hybrid``).
        protocol: ``1k``, ``5k`` or ``full`` (:func:`model.metrics.protocol_folds`).
        rerank_k: candidates per query re-scored in ``hybrid`` mode.
        batch_size: images, captions or pairs per forward pass.
        progress: show progress bars.
        student_weight: hybrid mode: weight of the decomposed score added to the teacher's
            when ordering the candidates (both z-scored per query); 0 = the teacher's order.
        keep_scores: keep each mode's text→image score matrices (``ModeResult.t2i_scores``),
            e.g. to score subsets of the queries.

    Returns:
        An :class:`EvaluationReport`: per mode the fold-mean recalls, model wall time
        (image decoding excluded), queries and pairs scored; and the speed-ups between modes.
    """
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {list(modes)}")
    if model is None and _NEEDS_STUDENT & set(modes):
        raise ValueError(f"modes {sorted(_NEEDS_STUDENT & set(modes))} need the decomposed model")
    if teacher is None and _NEEDS_TEACHER & set(modes):
        raise ValueError(
            f"modes {sorted(_NEEDS_TEACHER & set(modes))} need the early-interaction teacher"
        )
    if rerank_k < 1 or batch_size < 1:
        raise ValueError(f"rerank_k and batch_size must be >= 1, got {rerank_k}, {batch_size}")
    if len(captions) != len(caption_to_image):
        raise ValueError(
            f"{len(captions)} captions but caption_to_image has {len(caption_to_image)} entries"
        )
    caption_to_image = check_caption_to_image(caption_to_image, len(images))
    gallery = Gallery(images)
    folds = protocol_folds(len(gallery), protocol)
    evaluated = np.concatenate(folds)
    logger.info(
        "evaluating %s on %d images / %d captions, protocol %s (%d fold(s))",
        list(modes),
        evaluated.size,
        fold_captions(caption_to_image, evaluated).size,
        protocol,
        len(folds),
    )
    with _eval_mode(model, teacher):
        results = _run_modes(
            model,
            teacher,
            gallery,
            captions,
            caption_to_image,
            folds,
            modes,
            rerank_k,
            batch_size,
            progress,
            keep_scores,
            student_weight,
        )
    return EvaluationReport(
        protocol=protocol,
        n_images=int(evaluated.size),
        n_captions=int(fold_captions(caption_to_image, evaluated).size),
        n_folds=len(folds),
        rerank_k=rerank_k,
        results=results,
        decode_seconds=gallery.decode_seconds,
        speedups=speedups(results),
    )


@contextlib.contextmanager
def _eval_mode(*modules: object) -> Iterator[None]:
    """Dropout off while evaluating; each torch module's train/eval mode restored after."""
    present = [module for module in modules if isinstance(module, torch.nn.Module)]
    was_training = [module.training for module in present]
    for module in present:
        module.eval()
    try:
        yield
    finally:
        for module, training in zip(present, was_training, strict=True):
            module.train(training)


def _run_modes(
    model: VLDeformer | RuntimeEncoder | None,
    teacher: EarlyInteraction | None,
    gallery: Gallery,
    captions: Sequence[str],
    caption_to_image: np.ndarray,
    folds: list[np.ndarray],
    modes: Sequence[str],
    rerank_k: int,
    batch_size: int,
    progress: bool,
    keep_scores: bool = False,
    student_weight: float = 0.0,
) -> dict[str, ModeResult]:
    evaluated = np.concatenate(folds)
    results: dict[str, ModeResult] = {}
    decomposed_sims: list[np.ndarray] = []
    decomposed_clock = Stopwatch(gallery)
    if _NEEDS_STUDENT & set(modes):
        assert model is not None
        with decomposed_clock:
            needed_captions = fold_captions(caption_to_image, evaluated)
            # Embeddings do not depend on the fold: encode every evaluated item once.
            image_vectors = np.zeros((len(gallery), model.embedding_dim), dtype=np.float32)
            text_vectors = np.zeros((len(captions), model.embedding_dim), dtype=np.float32)
            image_vectors[evaluated], text_vectors[needed_captions] = encode_gallery(
                model,  # type: ignore[arg-type]  # any encoder with encode_images / encode_text
                gallery,
                evaluated,
                [captions[int(c)] for c in needed_captions],
                batch_size,
                progress,
            )
            for fold in folds:
                fold_text = fold_captions(caption_to_image, fold)
                decomposed_sims.append(image_vectors[fold] @ text_vectors[fold_text].T)

    fold_layouts = []
    for fold in folds:
        fold_text = fold_captions(caption_to_image, fold)
        fold_layouts.append((fold, fold_text, remap_to_fold(caption_to_image[fold_text], fold)))

    for mode in modes:
        per_fold: list[dict[str, float]] = []
        t2i_scores: list[np.ndarray] = []
        pairs = 0
        queries = 0
        clock = Stopwatch(gallery)
        for index, (fold, fold_text, mapping) in enumerate(fold_layouts):
            fold_captions_text = [captions[int(c)] for c in fold_text]
            queries += fold.size + fold_text.size
            if mode == "decomposed":
                per_fold.append(retrieval_metrics(decomposed_sims[index], mapping))
                t2i_scores.append(decomposed_sims[index].T)
            elif mode == "early":
                assert teacher is not None
                with clock:
                    sim = early_scores(
                        teacher, gallery, fold, fold_captions_text, batch_size, progress
                    )
                pairs += sim.size
                per_fold.append(retrieval_metrics(sim, mapping))
                t2i_scores.append(sim.T)
            else:
                assert teacher is not None
                with clock:
                    sim_i2t, sim_t2i, scored = hybrid_scores(
                        teacher,
                        gallery,
                        fold,
                        fold_captions_text,
                        decomposed_sims[index],
                        rerank_k,
                        batch_size,
                        progress,
                        student_weight,
                    )
                pairs += scored
                per_fold.append(retrieval_metrics(sim_i2t, mapping, sim_t2i=sim_t2i))
                t2i_scores.append(sim_t2i)
        seconds = clock.seconds + (decomposed_clock.seconds if mode != "early" else 0.0)
        results[mode] = ModeResult(
            mode=mode,
            metrics=mean_metrics(per_fold),
            per_fold=per_fold,
            seconds=seconds,
            n_queries=queries,
            pairs_scored=pairs,
            t2i_scores=t2i_scores if keep_scores else None,
        )
        logger.info("%s: rsum %.2f in %.2f s", mode, results[mode].metrics["rsum"], seconds)
    return results


def format_report(report: EvaluationReport) -> str:
    """A plain-text table: one row per mode, recalls, wall time, latency, then speed-ups."""
    header = (
        f"{'mode':<11}"
        + "".join(f"{key:>9}" for key in METRIC_KEYS[:-1])
        + f"{'time s':>10}{'ms/query':>10}{'pairs':>12}"
    )
    lines = [
        f"protocol {report.protocol}: {report.n_images} images, {report.n_captions} captions, "
        f"{report.n_folds} fold(s); image decoding {report.decode_seconds:.2f} s (not counted)",
        header,
    ]
    for mode, result in report.results.items():
        lines.append(
            f"{mode:<11}"
            + "".join(f"{result.metrics[key]:>9.2f}" for key in METRIC_KEYS[:-1])
            + f"{result.seconds:>10.2f}{result.ms_per_query:>10.3f}{result.pairs_scored:>12d}"
        )
    for name, factor in report.speedups.items():
        fast, slow = name.split("_vs_")
        lines.append(f"speed-up: {fast} is {factor:.1f}x faster than {slow}")
    return "\n".join(lines)


# ------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class EvalConfig:
    """What ``python -m model.evaluate`` evaluates; see :func:`build_parser` for each field."""

    data_path: Path
    model_path: Path | None = None
    teacher_path: Path | None = None
    split: str | None = "test"
    images_dir: Path | None = None
    modes: tuple[str, ...] = ("decomposed",)
    protocol: str = "1k"
    rerank_k: int = 16
    student_weight: float = 0.0
    max_images: int | None = None
    batch_size: int = 64
    device: str = "auto"
    runtime: str = "torch"  # encoder runtime of the decomposed model (model.runtime)
    json_path: Path | None = None
    progress: bool = True


def load_gallery(
    data_path: Path,
    split: str | None = "test",
    images_dir: Path | None = None,
    max_images: int | None = None,
) -> tuple[list[Path], list[str], np.ndarray]:
    """Image files, captions and caption→image mapping of a split (the first ``max_images``)."""
    image_paths, captions, caption_to_image = group_by_image(
        read_pairs(data_path, split=split, images_dir=images_dir)
    )
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        keep = np.flatnonzero(caption_to_image < max_images)
        image_paths = image_paths[:max_images]
        captions = [captions[int(c)] for c in keep]
        caption_to_image = caption_to_image[keep]
    return image_paths, captions, caption_to_image


def run(config: EvalConfig) -> EvaluationReport:
    """Load the checkpoints and the data named by ``config``, evaluate, write ``json_path``."""
    modes = set(config.modes)
    if modes & _NEEDS_STUDENT and config.model_path is None:
        raise ValueError(f"modes {sorted(modes & _NEEDS_STUDENT)} need --model")
    if modes & _NEEDS_TEACHER and config.teacher_path is None:
        raise ValueError(f"modes {sorted(modes & _NEEDS_TEACHER)} need --teacher")
    image_paths, captions, caption_to_image = load_gallery(
        config.data_path, config.split, config.images_dir, config.max_images
    )
    model = (
        _load_student(config.model_path, config.runtime, config.device)
        if config.model_path is not None and modes & _NEEDS_STUDENT
        else None
    )
    teacher = (
        EarlyInteraction.from_pretrained(config.teacher_path, device=config.device).eval()
        if config.teacher_path is not None and modes & _NEEDS_TEACHER
        else None
    )
    report = evaluate(
        model,
        image_paths,
        captions,
        caption_to_image,
        modes=config.modes,
        teacher=teacher,
        protocol=config.protocol,
        rerank_k=config.rerank_k,
        student_weight=config.student_weight,
        batch_size=config.batch_size,
        progress=config.progress,
    )
    if config.json_path is not None:
        config.json_path.parent.mkdir(parents=True, exist_ok=True)
        config.json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _load_student(model_path: Path, runtime: str, device: str) -> VLDeformer | RuntimeEncoder:
    """The decomposed model under ``runtime``; the ONNX runtimes run on the CPU (so there
    ``auto`` means the CPU). Raises :class:`model.runtime.RuntimeUnavailable` (a ValueError)."""
    if runtime == "torch":
        return VLDeformer.from_pretrained(model_path, device=device).eval()
    return load_encoder(model_path, runtime, device="cpu" if device == "auto" else device)


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(mode.strip() for mode in text.split(",") if mode.strip())
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(MODES)}, got {text!r}"
        )
    return modes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vldeformer-eval",
        description="Image-text retrieval recall (R@1/5/10 both ways, RSUM) and wall time of "
        "the decomposed model, early interaction and the hybrid re-ranker.",
    )
    parser.add_argument(
        "--model", type=Path, help="decomposed VLDeformer checkpoint dir (decomposed, hybrid)"
    )
    parser.add_argument(
        "--teacher",
        type=Path,
        help="original ViLT checkpoint dir with its retrieval head (early, hybrid)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="caption file: Karpathy dataset_*.json, COCO captions_*.json or JSONL",
    )
    parser.add_argument(
        "--split",
        default="test",
        help="split to evaluate (Karpathy/JSONL); 'none' for files without splits (default: test)",
    )
    parser.add_argument(
        "--images-dir",
        type=Path,
        help="folder the file's image paths are relative to (default: the data file's folder)",
    )
    parser.add_argument(
        "--modes",
        type=_modes,
        default=("decomposed",),
        help=f"comma-separated modes among {','.join(MODES)} (default: decomposed)",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="1k",
        help="1k: first 1000 images, or mean of 5 folds of 1000 with >= 5000 (COCO 1K); "
        "5k: first 5000 (COCO 5K); full: every image (default: 1k)",
    )
    parser.add_argument(
        "--rerank-k",
        type=_positive_int,
        default=16,
        help="hybrid mode: decomposed candidates per query re-scored (default: 16)",
    )
    parser.add_argument(
        "--student-weight",
        type=float,
        default=0.0,
        help="hybrid mode: order the candidates by the teacher's score plus this weight times "
        "the decomposed score, both z-scored per query (default: 0, the teacher alone)",
    )
    parser.add_argument(
        "--max-images",
        type=_positive_int,
        help="evaluate only the first N images and their captions (early mode scores every "
        "pair, so it is slow); combine with --protocol full below 1000",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=64,
        help="images, captions or pairs per forward pass (default: 64)",
    )
    parser.add_argument(
        "--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 (default: auto)"
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torch",
        help="encoder runtime of the decomposed model (decomposed, hybrid): torch, or ONNX "
        "Runtime fp32 / int8 on the CPU, exported and checked against torch on first use "
        "(default: torch)",
    )
    parser.add_argument("--json", type=Path, help="also write the full results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 on success, 2 on bad arguments or inputs."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = EvalConfig(
        data_path=args.data,
        model_path=args.model,
        teacher_path=args.teacher,
        split=None if args.split.lower() == "none" else args.split,
        images_dir=args.images_dir,
        modes=args.modes,
        protocol=args.protocol,
        rerank_k=args.rerank_k,
        student_weight=args.student_weight,
        max_images=args.max_images,
        batch_size=args.batch_size,
        device=args.device,
        runtime=args.runtime,
        json_path=args.json,
        progress=not args.no_progress,
    )
    try:
        report = run(config)
    except (CheckpointError, DatasetFormatError, ImageError, ValueError, OSError) as exc:
        print(f"vldeformer-eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
