"""`bench/service_load.py --smoke` runs a real server and reports every figure (CI runs it once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.helpers import load_bench


@pytest.mark.slow
def test_service_load_benchmark_smoke_run(tmp_path: Path) -> None:
    bench = load_bench("service_load")
    out = tmp_path / "service_load.json"
    assert (
        bench.main(["--smoke", "--work-dir", str(tmp_path / "work"), "--json-out", str(out)]) == 0
    )
    record = json.loads(out.read_text())
    assert record["command"].startswith("python bench/service_load.py --smoke")
    assert record["date"] and record["machine"]
    (report,) = record["reports"]
    assert report["model"] == "tiny" and report["vectors"] == 2000
    assert report["ready_s"] > 0
    names = [scenario["name"] for scenario in report["scenarios"]]
    assert names == [
        "text latency", "image latency", "text throughput batched", "image throughput batched",
    ]  # fmt: skip
    for scenario in report["scenarios"]:
        assert scenario["failures"] == 0 and scenario["statuses"] == {"200": scenario["requests"]}
        assert 0 < scenario["p50_ms"] <= scenario["p99_ms"]
        assert scenario["throughput_rps"] > 0
        assert scenario["endpoint"] in ("search/images", "search/captions")  # no leading "/"
    assert not list((tmp_path / "work").glob("index-*/.tmp-*"))  # the index was published


def test_service_load_help(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("service_load")
    with pytest.raises(SystemExit) as exited:
        bench.main(["--help"])
    assert exited.value.code == 0
    assert "--smoke" in capsys.readouterr().out


def test_service_load_publishes_under_the_build_lock(tiny_vilt_dir: Path, tmp_path: Path) -> None:
    from indexer.errors import UsageError
    from indexer.publish import BuildLock
    from indexer.store import read_current

    bench = load_bench("service_load")
    root = tmp_path / "index-tiny-20"
    with BuildLock(root), pytest.raises(UsageError, match="another build"):
        bench.prepare_index(tiny_vilt_dir, 20, tmp_path, "tiny")
    assert read_current(root) is None
    assert bench.prepare_index(tiny_vilt_dir, 20, tmp_path, "tiny") == (root, 32)
    assert read_current(root) is not None and not list(root.glob(".tmp-*"))
