"""`bench/paper_claim.py --smoke` and `bench/query_bench.py --smoke` run end to end and write
the summary keys BENCHMARKS.md is generated from (CI runs each once, on tiny random models)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.helpers import load_bench

SUMMARY_KEYS = {
    "protocol",
    "teacher_mean_recall",
    "decomposed_mean_recall",
    "hybrid_mean_recall",
    "from_scratch_mean_recall",
    "speedup_decomposed_vs_early_full",
}


def test_paper_claim_smoke_run_writes_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "paper_claim.json"
    assert load_bench("paper_claim").main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert set(summary) >= SUMMARY_KEYS
    assert summary["protocol"].startswith("first 5 test images")
    for key in SUMMARY_KEYS - {"protocol"}:
        assert isinstance(summary[key], int | float) and summary[key] >= 0
    assert [point["images"] for point in summary["speedup_curve"]] == [5, 20]
    names = [row["name"] for row in result["rows"]]
    assert "dual encoder from scratch, subset" in names
    # pooling, temperature, negatives, false negatives
    assert sum(name.startswith("ablation:") for name in names) == 4
    for row in result["rows"]:
        assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"} <= set(row)
    assert "/" not in json.dumps(result["models"])  # no machine paths in committed results


def test_query_bench_smoke_run_reports_every_system(tmp_path: Path) -> None:
    out = tmp_path / "query_bench.json"
    assert load_bench("query_bench").main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0.0 <= result["summary"]["served_colour_shape_p@10"] <= 1.0
    systems = result["results"]
    assert any(name.startswith("early interaction") for name in systems)
    assert any(name.startswith("hybrid") for name in systems)
    for by_wording in systems.values():
        assert set(by_wording) == {"trained", "held-out"}
        assert by_wording["trained"]["all"]["queries"] > 0


def test_rerank_service_smoke_run_measures_both_modes(tmp_path: Path) -> None:
    out = tmp_path / "rerank.json"
    assert load_bench("rerank_service").main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["concurrency"], row["rerank"]) for row in rows] == [
        (1, False),
        (1, True),
        (4, False),
        (4, True),
    ]
    for row in rows:
        assert row["statuses"].get("200") == row["requests"] > 0
        assert row["reranked_share"] == (1.0 if row["rerank"] else None)  # 4 clients < queue
        assert row["encode_ms_per_query"] > 0 and row["search_ms_per_query"] > 0
    assert rows[1]["rerank_ms_per_query"] > 0 and rows[0]["rerank_ms_per_query"] is None
