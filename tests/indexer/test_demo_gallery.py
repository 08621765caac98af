"""The demo gallery (model.synthetic's gallery.jsonl) carries metadata the indexer can filter
on, and an existing data folder gets it without its images being drawn again."""

from __future__ import annotations

import json
from pathlib import Path

from indexer.metadata import infer_field_types
from indexer.sources import read_gallery
from model.scenes import COLOURS, SHAPES, SIZES
from model.synthetic import PRESETS, main, read_examples, write_dataset

TINY = PRESETS["tiny"]


def _stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.rglob("*.png"))}


def test_demo_gallery_lines_carry_scene_metadata(tmp_path: Path) -> None:
    write_dataset(tmp_path, TINY)
    gallery = read_gallery(tmp_path / "gallery.jsonl")
    types = infer_field_types((image.id, image.metadata) for image in gallery.images)
    assert types == {
        "objects": "number", "colours": "string_list", "shapes": "string_list",
        "sizes": "string_list",
    }  # fmt: skip
    scenes = {
        ex.filename: ex.scene
        for ex in read_examples(tmp_path / "dataset.json")
        if ex.split == "test"
    }
    assert [image.id for image in gallery.images] == list(scenes)
    for image in gallery.images:
        objects = scenes[image.id].objects
        assert image.metadata["objects"] == len(objects)
        assert image.metadata["colours"] == sorted({o.colour for o in objects})
        assert set(image.metadata["colours"]) <= set(COLOURS)
        assert set(image.metadata["shapes"]) <= set(SHAPES)
        assert set(image.metadata["sizes"]) <= set(SIZES)


def test_an_existing_folder_gets_the_new_gallery_without_redrawing(tmp_path: Path) -> None:
    write_dataset(tmp_path, TINY)
    gallery = tmp_path / "gallery.jsonl"
    current = gallery.read_text()
    old_style = "".join(
        json.dumps({"id": r["id"], "path": r["path"]}) + "\n"
        for r in map(json.loads, current.splitlines())
    )
    for rerun in (lambda: write_dataset(tmp_path, TINY), lambda: main(["--out", str(tmp_path),
                  "--preset", "tiny"])):  # fmt: skip
        gallery.write_text(old_style)  # as an earlier generator wrote it
        images = _stats(tmp_path / "images")
        dataset = (tmp_path / "dataset.json").stat().st_mtime_ns
        rerun()
        assert gallery.read_text() == current
        assert _stats(tmp_path / "images") == images  # not one image drawn again
        assert (tmp_path / "dataset.json").stat().st_mtime_ns == dataset
    before = gallery.stat().st_mtime_ns
    write_dataset(tmp_path, TINY)
    assert gallery.stat().st_mtime_ns == before  # already current: not rewritten
