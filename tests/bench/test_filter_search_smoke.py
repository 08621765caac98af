"""`bench/filter_search.py --smoke` runs and reports sane rows (CI runs it once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.helpers import load_bench


def test_filter_search_benchmark_smoke_run(tmp_path: Path) -> None:
    bench = load_bench("filter_search")
    out = tmp_path / "filter_search.json"
    assert bench.main(["--smoke", "--json", str(out), "--work-dir", str(tmp_path)]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("python bench/filter_search.py --smoke")
    assert {"date", "machine", "faiss"} <= set(result)
    rows = result["rows"]
    assert [(row["index"], row["filter"]) for row in rows] == [
        (kind, label)
        for kind in ("flat", "ivf")
        for label in ("none", '{"bucket":{"lt":500}}', '{"bucket":{"lt":50}}',
                      '{"bucket":{"lt":1}}')
    ]  # fmt: skip
    for row in rows:
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"]
        assert 0 < row["selected"] <= row["vectors"]
        if row["filter"] != "none":
            assert row["select_ms"] > 0
    assert [row["selectivity"] for row in rows[1:4]] == pytest.approx([0.5, 0.05, 0.001], abs=0.02)
    assert all(row["recall_at_10"] == 1.0 for row in rows if row["index"] == "flat")
    assert all(row["recall_at_10"] >= 0.9 for row in rows)
