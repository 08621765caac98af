"""`bench/runtime_bench.py --smoke` measures every runtime on a tiny model (CI runs it once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.helpers import load_bench

pytest.importorskip("onnxruntime", reason="the `onnx` extra is not installed")


@pytest.mark.slow
def test_runtime_bench_smoke_run(tmp_path: Path) -> None:
    bench = load_bench("runtime_bench")
    out = tmp_path / "runtime_bench.json"
    assert bench.main(["--smoke", "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["command"] == "python bench/runtime_bench.py --smoke --work-dir " + str(
        tmp_path / "work"
    ) + " --out " + str(out)
    assert {"date", "machine", "checks", "rows"} <= payload.keys()
    rows = payload["rows"]
    assert {(row["runtime"], row["case"], row["batch"]) for row in rows} == {
        (runtime, case, batch)
        for runtime in ("torch", "onnx", "onnx-int8")
        for case, batch in (("text", 1), ("text", 32), ("image", 1), ("image", 16))
    }
    for row in rows:
        assert row["median_ms"] > 0 and row["threads"] == 1
        assert row["min_cosine"] >= (0.9999 if row["runtime"] != "onnx-int8" else 0.99)
    checks = payload["checks"]["tiny random"]
    assert checks["onnx"]["passed"] and checks["onnx-int8"]["passed"]
    # The exports went to the work directory, not next to a committed model.
    assert list((tmp_path / "work" / "tiny" / "onnx-cache").glob("*/onnx-int8/text.onnx"))
