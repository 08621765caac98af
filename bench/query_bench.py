"""Short queries, as people type them, against the demo gallery: precision@10 and nDCG@10.

    python bench/query_bench.py            # the committed demo models, ~2 min on 2 CPU cores
    python bench/query_bench.py --smoke    # tiny data and random models, seconds (CI)

The queries (``model.queries.benchmark_queries``): every colour+shape pair ("a red circle"),
colour alone, shape alone, size+colour+shape, relations between shapes or colours ("a circle to
the left of a square"), counts ("two shapes", "two red shapes"). Each is worded twice: with a
phrasing the training captions use, and with a *held-out* phrasing no training caption uses.
Relevance comes from the scene specs (``model.queries.matches``), never from captions: every
test image that holds a match is relevant.

Systems: decomposed (one text encoding, dot products with the gallery vectors — exactly what
the service's flat index returns), hybrid (the decomposed top ``--rerank-k`` re-scored by the
teacher), early interaction (the teacher scores every query-image pair, on the first
``--early-images`` images; the decomposed and hybrid rows are repeated on that subset, like for
like), and the bag-of-words oracle (scene words, no binding). Nothing is tuned on the test split.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import EarlyInteraction, VLDeformer  # noqa: E402
from model.bow import bag_of_words_similarity  # noqa: E402
from model.eval_scoring import Gallery, early_scores, rerank, top_k  # noqa: E402
from model.images import open_image  # noqa: E402
from model.metrics import ranking_metrics  # noqa: E402
from model.queries import Query, benchmark_queries, matches, phrase  # noqa: E402
from model.synthetic import PRESETS, read_examples, write_dataset  # noqa: E402

DEMO = ROOT / "model" / "assets" / "demo"
K = 10


def _rerank_scores(
    teacher: EarlyInteraction,
    gallery: Gallery,
    texts: list[str],
    decomposed: np.ndarray,
    rerank_k: int,
    batch_size: int,
) -> np.ndarray:
    """Decomposed scores with each query's top ``rerank_k`` re-scored by the teacher and
    placed above every other image, in the teacher's order (``eval_scoring.rerank``)."""
    candidates = top_k(decomposed, rerank_k)  # (queries, k)
    rescored = np.stack(
        [
            early_scores(teacher, gallery, cands, [text], batch_size)[:, 0]  # (k,)
            for text, cands in zip(texts, candidates, strict=True)
        ]
    )
    return rerank(decomposed, candidates, rescored)


def _by_category(
    categories: list[str], scores: np.ndarray, relevant: np.ndarray
) -> dict[str, dict[str, float]]:
    rows: dict[str, list[int]] = defaultdict(list)
    for index, category in enumerate(categories):
        rows[category].append(index)
    out = {name: ranking_metrics(scores[idx], relevant[idx], K) for name, idx in rows.items()}
    out["all"] = ranking_metrics(scores, relevant, K)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    preset = PRESETS["tiny" if args.smoke else "demo"]
    write_dataset(args.data, preset)
    examples = [ex for ex in read_examples(args.data / "dataset.json") if ex.split == "test"]
    scenes = [ex.scene for ex in examples]
    images = [open_image(args.data / "images" / ex.filename) for ex in examples]
    model = VLDeformer.from_pretrained(args.models / "decomposed", device="cpu")
    teacher = EarlyInteraction.from_pretrained(args.models / "teacher", device="cpu")
    image_vectors = model.encode_images(images, batch_size=args.batch_size)

    rng = random.Random(0)
    listed: list[tuple[str, Query]] = benchmark_queries()
    categories: list[str] = []
    texts: list[str] = []
    wordings: list[str] = []
    query_list: list[Query] = []
    for category, query in listed:
        for held_out in (False, True):
            categories.append(category)
            texts.append(phrase(query, rng, held_out=held_out))
            wordings.append("held-out" if held_out else "trained")
            query_list.append(query)
    relevant = np.array([[matches(q, scene) for scene in scenes] for q in query_list])
    decomposed = model.encode_text(texts) @ image_vectors.T  # (queries, images)
    gallery = Gallery(images)
    hybrid = _rerank_scores(teacher, gallery, texts, decomposed, args.rerank_k, args.batch_size)
    bow = bag_of_words_similarity(texts, scenes)

    subset = min(args.early_images, len(images))
    early = early_scores(
        teacher, gallery, np.arange(subset), texts, args.batch_size, progress=not args.smoke
    ).T  # (queries, subset)
    sub_hybrid = _rerank_scores(
        teacher,
        Gallery(images[:subset]),
        texts,
        decomposed[:, :subset],
        args.rerank_k,
        args.batch_size,
    )

    systems = {
        f"decomposed, {len(images)} images": (decomposed, relevant),
        f"hybrid K={args.rerank_k}, {len(images)} images": (hybrid, relevant),
        f"bag-of-words oracle, {len(images)} images": (bow, relevant),
        f"early interaction, first {subset} images": (early, relevant[:, :subset]),
        f"decomposed, first {subset} images": (decomposed[:, :subset], relevant[:, :subset]),
        f"hybrid K={args.rerank_k}, first {subset} images": (sub_hybrid, relevant[:, :subset]),
    }
    trained = np.array([w == "trained" for w in wordings])
    results: dict[str, Any] = {}
    for name, (scores, rel) in systems.items():
        results[name] = {
            wording: _by_category(
                [c for c, keep in zip(categories, mask, strict=True) if keep],
                scores[mask],
                rel[mask],
            )
            for wording, mask in (("trained", trained), ("held-out", ~trained))
        }
    decomposed_name = f"decomposed, {len(images)} images"
    colour_shape = results[decomposed_name]["trained"]["colour+shape"]
    examples_out = [
        {
            "query": texts[i],
            "category": categories[i],
            "relevant_images": int(relevant[i].sum()),
            "top10_relevant": int(relevant[i, np.argsort(-decomposed[i])[:K]].sum()),
        }
        for i in range(0, len(texts), max(1, len(texts) // 12))
    ]
    return {
        "command": "python bench/query_bench.py" + (" --smoke" if args.smoke else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, CPU",
        "models": {"decomposed": model.fingerprint[:16]},
        "gallery": {"images": len(images), "queries": len(texts)},
        "summary": {
            "served_colour_shape_p@10": round(colour_shape["p@10"], 4),
            "served_colour_shape_ndcg@10": round(colour_shape["ndcg@10"], 4),
            "target_colour_shape_p@10": 0.9,
        },
        "results": results,
        "examples": examples_out,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """One table per wording: rows = systems, columns = categories (P@10 / nDCG@10)."""
    lines = []
    for wording in ("trained", "held-out"):
        first = next(iter(result["results"].values()))[wording]
        categories = list(first)
        lines.append(f"\n{wording} phrasings — P@10 / nDCG@10\n")
        lines.append("| system | " + " | ".join(categories) + " |")
        lines.append("|---|" + "---|" * len(categories))
        for name, by_wording in result["results"].items():
            cells = [
                f"{by_wording[wording][c]['p@10']:.3f} / {by_wording[wording][c]['ndcg@10']:.3f}"
                for c in categories
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--models", type=Path, default=DEMO, help="folder with teacher/, decomposed/"
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT / "data" / "demo", help="synthetic dataset folder"
    )
    parser.add_argument("--rerank-k", type=int, default=16, help="hybrid candidates per query")
    parser.add_argument(
        "--early-images", type=int, default=300, help="images scored by early interaction"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="items per forward pass")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "query_bench.json",
        help="where the JSON result goes",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny data and random models (CI)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        from model.testing import make_tiny_demo_models

        scratch = Path(tempfile.mkdtemp(prefix="query-bench-smoke-"))
        args.models, args.data = make_tiny_demo_models(scratch / "models"), scratch / "data"
        args.early_images, args.batch_size = 5, 16
        if args.out == build_parser().get_default("out"):  # never overwrite committed results
            args.out = scratch / "query_bench.json"
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(to_markdown(result))
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
