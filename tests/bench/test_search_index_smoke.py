"""`bench/search_index.py --smoke` runs and reports sane rows (CI runs it once)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.helpers import load_bench


def test_search_benchmark_smoke_run(tmp_path: Path) -> None:
    bench = load_bench("search_index")
    out = tmp_path / "rows.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [row["index"] for row in rows] == ["flat", "ivf", "hnsw"]
    assert rows[0]["recall_at_10"] == 1.0
    for row in rows:
        assert 0.0 < row["recall_at_10"] <= 1.0
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"] and row["batch_qps"] > 0
    assert all(
        row["recall_at_10"] >= 0.9 for row in rows[1:]
    )  # tuned to >= 0.95 on its own queries
