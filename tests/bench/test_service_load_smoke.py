"""`bench/service_load.py --smoke` runs a real server and reports every figure (CI runs it once)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_service_load_benchmark_smoke_run(tmp_path: Path) -> None:
    bench = load_bench("service_load")
    out = tmp_path / "service_load.json"
    assert (
        bench.main(["--smoke", "--work-dir", str(tmp_path / "work"), "--json-out", str(out)]) == 0
    )
    (report,) = json.loads(out.read_text())
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
    assert not list((tmp_path / "work").glob("index-*/.tmp-*"))  # the index was published


def test_service_load_help(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("service_load")
    with pytest.raises(SystemExit) as exited:
        bench.main(["--help"])
    assert exited.value.code == 0
    assert "--smoke" in capsys.readouterr().out
