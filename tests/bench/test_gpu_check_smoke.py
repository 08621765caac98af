"""`bench/gpu_check.py --smoke` runs every section on the CPU and reports their figures (CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.helpers import REPO, load_bench


@pytest.mark.slow
def test_gpu_check_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(out),
         "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["mode"] == "smoke" and report["device"] == "cpu"
    assert set(report["machine"]) >= {"hostname", "cpu_count"} and report["total_s"] > 0
    sections = report["sections"]
    assert list(sections) == ["environment", "training", "indexer", "service"]
    for name, section in sections.items():
        assert section["error"] is None, (name, section["error"])
        assert section["seconds"] > 0
    environment = sections["environment"]
    assert environment["torch"] and environment["faiss"]
    assert environment["faiss_install"] == "skipped: no CUDA device"
    training = sections["training"]
    assert training["steps_done"] == 3 and training["pairs_per_s"] > 0
    indexer = sections["indexer"]
    assert indexer["images"] == 40 and indexer["images_per_s"] > 0
    assert 70 < indexer["jpeg_mean_kb"] < 140  # photo-like 640x480 JPEGs
    service = sections["service"]
    assert service["vectors"] == 2000 and service["ready_s"] > 0
    assert [s["concurrency"] for s in service["scenarios"]] == [1, 4]
    for scenario in service["scenarios"]:
        assert scenario["requests"] > 0 and scenario["failures"] == 0
        assert scenario["qps"] > 0 and 0 < scenario["p50_ms"] <= scenario["p99_ms"]
        assert scenario["server_encode_mean_ms"] > 0
    assert service["scenarios"][0]["mean_batch"] == 1.0
    assert service["batch1_server_encode_p50_ms"] > 0


def test_histogram_quantile_interpolates_within_the_bucket() -> None:
    load = load_bench("gpu_check_service")
    before = load.Histogram({0.001: 0.0, 0.005: 2.0, float("inf"): 2.0}, 0.004, 2.0)
    after = load.Histogram({0.001: 2.0, 0.005: 6.0, float("inf"): 8.0}, 0.030, 8.0)
    window = after.since(before)  # 2 in (0, 1] ms, 2 in (1, 5] ms, 2 above 5 ms
    assert window.count == 6.0 and window.mean_ms() == pytest.approx(26 / 6, abs=1e-3)
    assert window.quantile_ms(0.5) == pytest.approx(3.0)  # rank 3: half-way through (1, 5]
    assert window.quantile_ms(0.99) == pytest.approx(5.0)  # the +Inf bucket: its lower bound
    assert load.Histogram({}, 0.0, 0.0).quantile_ms(0.5) is None


def test_training_figures_leave_out_the_first_steps(tmp_path: Path) -> None:
    gpu_check = load_bench("gpu_check")
    log = tmp_path / "metrics.jsonl"
    rates = (10.0, 100.0, 50.0)  # pairs/s of steps 1..3 at batch 10: 1 s, 0.1 s, 0.2 s
    lines = [
        json.dumps({"step": i + 1, "loss": 1.0, "pairs_per_s": r}) for i, r in enumerate(rates)
    ]
    log.write_text("\n".join(lines) + "\n")
    figures = gpu_check.training_figures(log, batch=10, skip=1)
    assert figures["steps_done"] == 3 and figures["steady_steps"] == 2
    assert figures["pairs_per_s"] == pytest.approx(20 / 0.3, abs=0.1)
    assert figures["first_step_s"] == 1.0
    assert gpu_check.training_figures(tmp_path / "absent.jsonl", 10, 1) == {"steps_done": 0}


def test_gpu_check_rejects_an_unknown_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_bench("gpu_check").main(["--sections", "training,gpu"]) == 2
    assert "--sections" in capsys.readouterr().err
