"""`bench/ivfpq_ondisk.py --smoke` builds, reads back and searches a tiny on-disk IVF-PQ."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.helpers import load_bench


def test_ivfpq_ondisk_benchmark_smoke_run(tmp_path: Path) -> None:
    bench = load_bench("ivfpq_ondisk")
    out = tmp_path / "ivfpq_ondisk.json"
    assert bench.main(["--smoke", "--json", str(out), "--work-dir", str(tmp_path / "w")]) == 0
    record = json.loads(out.read_text())
    assert record["command"] == "python bench/ivfpq_ondisk.py --smoke"
    assert {"date", "machine", "faiss"} <= set(record)
    assert record["n"] == 20_000 and record["bytes"]["ivfdata_file"] > 0
    assert all(record["seconds"][stage] >= 0 for stage in ("train", "fill", "merge"))
    assert record["peak_rss_mib"]["total"] > 0
    assert [row["nprobe"] for row in record["rows"]] == [4, 16]
    for row in record["rows"]:
        assert 0.0 < row["recall_at_10"] <= 1.0 and 0 < row["p50_ms"] <= row["p99_ms"]
    assert str(tmp_path) not in out.read_text()  # no absolute paths
