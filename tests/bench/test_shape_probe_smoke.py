"""`bench/shape_probe.py --smoke` runs, and its labels are the scenes' truth (CI runs it once)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from model.scenes import COLOURS, SHAPES
from tests.bench.helpers import load_bench


def test_labels_name_exactly_what_a_scene_holds() -> None:
    bench = load_bench("shape_probe")
    rng = random.Random(3)
    for _ in range(50):
        scene = bench.random_scene(rng)
        labels = dict(zip(bench.LABELS, bench.labels_of(scene), strict=True))
        assert {s for s in SHAPES if labels[s]} == {o.shape for o in scene.objects}
        assert {c for c in COLOURS if labels[c]} == {o.colour for o in scene.objects}


def test_shape_probe_smoke_run(tmp_path: Path) -> None:
    bench = load_bench("shape_probe")
    out = tmp_path / "probe.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("python bench/shape_probe.py")
    assert [row["step"] for row in result["curve"]] == [0, 2, 4]
    for row in result["curve"]:
        assert set(row["per_label"]) == {*SHAPES, *COLOURS}
        assert all(0.0 <= v <= 1.0 for v in row["per_label"].values())
