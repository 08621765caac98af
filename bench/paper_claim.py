"""The paper's headline on the synthetic test split: decomposition is >1000x faster than early
interaction at (almost) the same recall.

    python bench/paper_claim.py              # full run (~1 h on 2 CPU cores, ablations included)
    python bench/paper_claim.py --smoke      # tiny data and models, seconds (CI)

Rows: (i) early interaction — the teacher scores every caption-image pair (the paper's
baseline); (ii) decomposed — every image and caption encoded alone, dot products; (iii) hybrid —
decomposed top-K re-ranked by the teacher; ablations at the decomposition's training budget
(from scratch instead of from the teacher; uni-modal instead of bi-modal negatives); and an
oracle bag-of-words matcher (scene words, no binding, no order).

Early interaction over the full 1K protocol is 1,000 x 5,000 = 5M joint forward passes: on this
machine that takes hours, so its *recall* is measured on the first ``--early-images`` test
images (all three modes are also scored on that same subset, like for like) and its *time* for
the full protocol is extrapolated from the measured pairs/s. Every such number is labelled.
Nothing is tuned on the test split. Writes ``bench/results/paper_claim.json`` and prints
markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import EarlyInteraction, VLDeformer  # noqa: E402
from model.bow import bag_of_words_similarity  # noqa: E402
from model.data import group_by_image, read_pairs  # noqa: E402
from model.demo_model import DemoModelConfig, decompose  # noqa: E402
from model.evaluate import EvaluationReport, evaluate  # noqa: E402
from model.images import open_image  # noqa: E402
from model.metrics import retrieval_metrics  # noqa: E402
from model.synthetic import PRESETS, read_examples, write_dataset  # noqa: E402

DEMO = ROOT / "model" / "assets" / "demo"


def _row(
    name: str, metrics: dict[str, float], seconds: float | None, queries: int, note: str = ""
) -> dict[str, Any]:
    return {
        "name": name,
        **{key: round(value, 2) for key, value in metrics.items()},
        "seconds": None if seconds is None else round(seconds, 3),
        "ms_per_query": None if seconds is None else round(1000 * seconds / queries, 3),
        "note": note,
    }


def _mode_row(name: str, report: EvaluationReport, mode: str, note: str = "") -> dict[str, Any]:
    result = report.results[mode]
    return _row(name, result.metrics, result.seconds, result.n_queries, note)


def _hard_t2i_r1(
    sim_t2i: np.ndarray, caption_to_image: np.ndarray, hard_captions: np.ndarray
) -> float:
    """Text→image R@1 (pessimistic ties) over the captions of images that have a twin."""
    sims = sim_t2i[hard_captions]
    own = sims[np.arange(len(hard_captions)), caption_to_image[hard_captions]]
    others = sims.copy()
    others[np.arange(len(hard_captions)), caption_to_image[hard_captions]] = -np.inf
    return float(100.0 * np.mean(own > others.max(axis=1)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    data_dir: Path = args.data
    preset = PRESETS["tiny" if args.smoke else "demo"]
    write_dataset(data_dir, preset)
    dataset_json = data_dir / "dataset.json"
    model_dir, teacher_dir = args.models / "decomposed", args.models / "teacher"
    model = VLDeformer.from_pretrained(model_dir, device="cpu")
    teacher = EarlyInteraction.from_pretrained(teacher_dir, device="cpu")

    pairs = read_pairs(dataset_json, split="test")
    image_paths, captions, caption_to_image = group_by_image(pairs)
    images = [open_image(path) for path in image_paths]  # decoded up front: not part of any timing
    n_images, n_captions = len(images), len(captions)
    examples = {
        Path(ex.filename).name: ex for ex in read_examples(dataset_json) if ex.split == "test"
    }
    scenes = [examples[path.name].scene for path in image_paths]
    hard_images = np.array([bool(examples[path.name].twin_of) for path in image_paths])
    hard_captions = np.flatnonzero(hard_images[caption_to_image])
    rows: list[dict[str, Any]] = []

    # (ii) decomposed and (iii) hybrid over the whole test split.
    full = evaluate(
        model,
        images,
        captions,
        caption_to_image,
        modes=("decomposed", "hybrid"),
        teacher=teacher,
        rerank_k=args.rerank_k,
        batch_size=args.batch_size,
        progress=not args.smoke,
    )
    rows.append(
        _mode_row(
            "decomposed (ii)", full, "decomposed", f"{n_images} images / {n_captions} captions"
        )
    )
    rows.append(
        _mode_row(
            f"hybrid (iii), K={args.rerank_k}",
            full,
            "hybrid",
            f"{n_images} images / {n_captions} captions",
        )
    )

    # Like-for-like subset with (i) early interaction.
    subset = min(args.early_images, n_images)
    sub_caps = np.flatnonzero(caption_to_image < subset)
    sub = evaluate(
        model,
        images[:subset],
        [captions[i] for i in sub_caps],
        caption_to_image[sub_caps],
        modes=("decomposed", "hybrid", "early"),
        teacher=teacher,
        rerank_k=args.rerank_k,
        batch_size=args.batch_size,
        progress=not args.smoke,
    )
    early = sub.results["early"]
    pairs_per_second = early.pairs_scored / early.seconds
    full_pairs = n_images * n_captions
    early_full_seconds = full_pairs / pairs_per_second
    note = f"first {subset} images / {len(sub_caps)} captions"
    rows.append(_mode_row("early interaction (i), subset", sub, "early", note))
    rows.append(_mode_row("decomposed (ii), subset", sub, "decomposed", note))
    rows.append(_mode_row(f"hybrid (iii), K={args.rerank_k}, subset", sub, "hybrid", note))

    # Bag-of-words oracle: scene words, no binding, no order.
    bow = bag_of_words_similarity(captions, scenes)  # (n_captions, n_images)
    rows.append(
        _row(
            "bag-of-words oracle",
            retrieval_metrics(bow.T, caption_to_image),
            None,
            1,
            f"{n_images} images",
        )
    )
    decomposed_sim = model.encode_text(captions) @ model.encode_images(images).T
    hard = {
        "n_hard_captions": int(hard_captions.size),
        "bow_t2i_r1": _hard_t2i_r1(bow, caption_to_image, hard_captions),
        "decomposed_t2i_r1": _hard_t2i_r1(decomposed_sim, caption_to_image, hard_captions),
    }

    # Ablations at the decomposition's budget, from the committed demo build's own settings.
    ablations: list[dict[str, Any]] = []
    if not args.skip_ablations:
        build_file = args.models / "build.json"
        built = json.loads(build_file.read_text())["config"] if build_file.exists() else {}
        settings = {f.name for f in dataclasses.fields(DemoModelConfig)} - {"out_dir", "data_dir"}
        base = DemoModelConfig(**{k: v for k, v in built.items() if k in settings})
        base = dataclasses.replace(base, data_dir=data_dir)
        if args.ablation_steps:
            base = dataclasses.replace(base, decompose_steps=args.ablation_steps)
        if args.smoke:
            base = dataclasses.replace(base, decompose_batch_size=8)
        for name, start, negatives in (
            ("from scratch (no stage a)", "scratch", "bimodal"),
            ("uni-modal negatives", "teacher", "unimodal"),
        ):
            with tempfile.TemporaryDirectory() as work:
                config = dataclasses.replace(base, out_dir=Path(work) / "out", negatives=negatives)
                init = Path(work) / "init"
                if start == "scratch":
                    from model.backbone import init_vilt_checkpoint
                    from model.synthetic import VOCABULARY

                    init_vilt_checkpoint(
                        init,
                        words=VOCABULARY,
                        image_size=base.image_size,
                        patch_size=base.patch_size,
                        hidden_size=model.embedding_dim,
                        num_layers=model.vilt.config.num_hidden_layers,
                        num_heads=model.vilt.config.num_attention_heads,
                        intermediate_size=model.vilt.config.intermediate_size,
                        seed=base.seed,
                    )
                started = time.perf_counter()
                ablated_dir = decompose(
                    config, init if start == "scratch" else teacher_dir, Path(work)
                )
                train_seconds = time.perf_counter() - started
                ablated = VLDeformer.from_pretrained(ablated_dir, device="cpu")
                report = evaluate(
                    ablated,
                    images,
                    captions,
                    caption_to_image,
                    modes=("decomposed",),
                    batch_size=args.batch_size,
                )
                row = _mode_row(
                    f"ablation: {name}",
                    report,
                    "decomposed",
                    f"{config.decompose_steps} steps, trained in {train_seconds:.0f} s",
                )
                ablations.append(row)
        rows.extend(ablations)

    decomposed_full = full.results["decomposed"]
    hybrid_full = full.results["hybrid"]
    summary = {
        "early_pairs_per_second": round(pairs_per_second, 1),
        "early_full_protocol_seconds_extrapolated": round(early_full_seconds, 1),
        "speedup_decomposed_vs_early_full": round(early_full_seconds / decomposed_full.seconds, 1),
        "speedup_hybrid_vs_early_full": round(early_full_seconds / hybrid_full.seconds, 1),
        "speedup_decomposed_vs_early_subset_measured": round(
            early.seconds / sub.results["decomposed"].seconds, 1
        ),
        "speedup_hybrid_vs_early_subset_measured": round(
            early.seconds / sub.results["hybrid"].seconds, 1
        ),
        "mean_recall_drop_decomposed_vs_early_subset": round(
            early.metrics["mean_recall"] - sub.results["decomposed"].metrics["mean_recall"], 2
        ),
        "mean_recall_gain_hybrid_vs_early_subset": round(
            sub.results["hybrid"].metrics["mean_recall"] - early.metrics["mean_recall"], 2
        ),
        "hard_cases": hard,
    }
    return {
        "command": "python bench/paper_claim.py" + (" --smoke" if args.smoke else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU",
        "models": {"decomposed": model.fingerprint[:16], "teacher": str(teacher_dir)},
        "test_split": {
            "images": n_images,
            "captions": n_captions,
            "hard_images": int(hard_images.sum()),
        },
        "rerank_k": args.rerank_k,
        "rows": rows,
        "summary": summary,
    }


def to_markdown(result: dict[str, Any]) -> str:
    header = "| system | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM | mean R | total s | ms/query | on |"
    lines = [header, "|" + "---|" * 12]
    for row in result["rows"]:
        seconds = "—" if row["seconds"] is None else f"{row['seconds']:.2f}"
        per_query = "—" if row["ms_per_query"] is None else f"{row['ms_per_query']:.3f}"
        lines.append(
            f"| {row['name']} | {row['i2t_r1']:.1f} | {row['i2t_r5']:.1f} | {row['i2t_r10']:.1f} | "
            f"{row['t2i_r1']:.1f} | {row['t2i_r5']:.1f} | {row['t2i_r10']:.1f} | {row['rsum']:.1f} | "
            f"{row['mean_recall']:.2f} | {seconds} | {per_query} | {row['note']} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--models",
        type=Path,
        default=DEMO,
        help="folder with teacher/ and decomposed/ (default: the committed demo models)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=ROOT / "data" / "demo",
        help="synthetic dataset folder, generated if missing",
    )
    parser.add_argument(
        "--rerank-k",
        type=int,
        default=8,
        help="hybrid: decomposed candidates re-scored per query (default 8)",
    )
    parser.add_argument(
        "--early-images",
        type=int,
        default=100,
        help="test images scored exhaustively by early interaction (default 100)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=128, help="pairs / items per forward pass"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1; 2 threads on a shared 2-core machine ran 5-10x slower)",
    )
    parser.add_argument(
        "--skip-ablations", action="store_true", help="skip the two ablation trainings"
    )
    parser.add_argument(
        "--ablation-steps",
        type=int,
        default=0,
        help="decomposition steps of each ablation (default: the demo build's)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "paper_claim.json",
        help="where the JSON result goes",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny data and tiny random models: checks the script runs (CI)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        from model.testing import make_tiny_vilt

        scratch = Path(tempfile.mkdtemp(prefix="paper-claim-smoke-"))
        teacher = make_tiny_vilt(scratch / "models" / "teacher")
        VLDeformer.from_pretrained(teacher).save_pretrained(scratch / "models" / "decomposed")
        args.models, args.data = scratch / "models", scratch / "data"
        args.early_images, args.ablation_steps, args.batch_size = 5, 2, 16
        args.out = scratch / "paper_claim.json"
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(to_markdown(result))
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
