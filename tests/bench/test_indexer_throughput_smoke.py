"""`bench/indexer_throughput.py --smoke` runs real builds and reports their rates (CI runs it once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.helpers import load_bench


@pytest.mark.slow
def test_indexer_throughput_smoke_run(tmp_path: Path) -> None:
    bench = load_bench("indexer_throughput")
    out = tmp_path / "rows.json"
    assert bench.main(["--smoke", "--work-dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [row["workers"] for row in rows] == [0, 1]
    for row in rows:
        assert row["images"] == 16 and row["captions"] == 16
        assert row["images_per_s"] > 0 and row["captions_per_s"] > 0
        assert 0.0 < row["decode_share"] < 1.0
    assert (tmp_path / "work" / "index-w0" / "CURRENT").is_file()
