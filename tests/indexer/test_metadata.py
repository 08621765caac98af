"""Manifest metadata: fields typed from the manifest, bad values named by file and line,
stored in metadata.sqlite, shown by ``info``; versions written before it still open."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from indexer.cli import main
from indexer.errors import UsageError
from indexer.metadata import infer_field_types
from indexer.publish import ImageRow, publish_vectors, write_manifest
from indexer.sources import read_gallery
from indexer.store import (
    FilterError,
    IndexVersion,
    MetadataField,
    read_manifest,
    verify_version,
    version_dir,
)
from tests.indexer.conftest import BuiltIndex

DIM = 8


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------- reading manifests
def test_jsonl_extra_keys_become_typed_metadata(tmp_path: Path) -> None:
    manifest = write_jsonl(
        tmp_path / "g.jsonl",
        [
            {"path": "a.png", "album": "2024", "year": 2021, "score": 0.5, "ok": True,
             "tags": ["cat", "sea"], "caption": "a cat"},
            {"path": "b.png", "year": 1999.5, "tags": [], "album": None},
            {"path": "c.png", "extra": None},
        ],
    )  # fmt: skip
    images = read_gallery(manifest).images
    assert images[0].metadata == {
        "album": "2024", "year": 2021, "score": 0.5, "ok": True, "tags": ["cat", "sea"]
    }  # fmt: skip
    assert images[0].captions == ("a cat",)  # reserved keys are not metadata
    assert images[1].metadata == {"year": 1999.5, "tags": []}  # null = no value
    assert images[2].metadata == {}
    types = infer_field_types((image.id, image.metadata) for image in images)
    assert types == {
        "album": "string", "year": "number", "score": "number", "ok": "boolean",
        "tags": "string_list",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (
            {"path": "b.png", "year": "2024"},
            r"'year' is a string here \('2024'\) but a number at \S+g\.jsonl:1 \(2020\)",
        ),
        ({"path": "b.png", "year": True}, r"'year' is a boolean here \(True\) but a number"),
        (
            {"path": "b.png", "tags": "cat"},
            r"'tags' is a string here .* but a string_list at \S+:1",
        ),
        ({"path": "b.png", "where": {"lat": 1}}, "'where': a dict value"),
        ({"path": "b.png", "tags": ["cat", 3]}, "'tags': a list must hold only strings"),
    ],
)
def test_a_value_of_another_type_names_file_and_line(
    tmp_path: Path, second: dict[str, object], message: str
) -> None:
    manifest = write_jsonl(
        tmp_path / "g.jsonl",
        [{"path": "a.png", "year": 2020, "tags": ["dog"]}, {"path": "x.png"}, second],
    )
    with pytest.raises(UsageError, match=message) as info:
        read_gallery(manifest)
    assert str(info.value).startswith(f"{manifest}:3: metadata field")


def test_non_finite_numbers_are_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "g.jsonl"
    manifest.write_text('{"path": "a.png", "score": NaN}\n')
    with pytest.raises(UsageError, match=rf"{manifest}:1: metadata field 'score': nan"):
        read_gallery(manifest)


def test_csv_columns_are_strings_unless_every_cell_is_a_number(tmp_path: Path) -> None:
    manifest = tmp_path / "g.csv"
    manifest.write_text(
        "path,id,captions,year,album,rating,note\n"
        "a.png,a,a dog,2021,2024, 1.5 ,hello\n"
        "b.png,b,,1999,holiday,2e1,\n"
        "c.png,c,,,42,-.5,\n"
    )
    images = read_gallery(manifest).images
    assert [image.metadata for image in images] == [
        {"year": 2021, "album": "2024", "rating": 1.5, "note": "hello"},
        {"year": 1999, "album": "holiday", "rating": 20.0},
        {"album": "42", "rating": -0.5},
    ]
    assert isinstance(images[0].metadata["year"], int)


# ---------------------------------------------------------------------- storing and reading
def test_metadata_round_trips_through_the_store(tmp_path: Path) -> None:
    fields = [
        {"album": "a", "year": 2020, "score": 2.0, "ok": False, "tags": ["x", "y"]},
        {"year": 2**70, "tags": []},  # beyond sqlite's integers: stored as a float, kept as written
        {},
    ]
    rows = [ImageRow(i, f"img-{i}", f"/g/{i}.png", (), fields[i]) for i in range(3)]
    publish_vectors(tmp_path, fingerprint="f" * 64, image_rows=rows, image_vectors=unit_rows(3))
    assert verify_version(tmp_path) == []
    with IndexVersion.open(tmp_path) as version:
        assert version.metadata_fields == {
            "album": MetadataField("album", "string"),
            "ok": MetadataField("ok", "boolean"),
            "score": MetadataField("score", "number"),
            "tags": MetadataField("tags", "string_list"),
            "year": MetadataField("year", "number"),
        }
        records = version.image_records([0, 1, 2])
        assert [record.metadata for record in records] == fields
        assert isinstance(records[0].metadata["score"], float)
        assert isinstance(records[0].metadata["year"], int)
        assert version.image_by_id("img-1").metadata == fields[1]  # type: ignore[union-attr]
        assert version.select("images", {"year": {"gt": 2**69}}).rows.tolist() == [1]
        assert version.select("images", {"score": 2}).rows.tolist() == [0]  # 2 == 2.0


def test_publishing_rows_of_mixed_types_names_the_image(tmp_path: Path) -> None:
    rows = [
        ImageRow(0, "first", "/g/0.png", (), {"year": 2020}),
        ImageRow(1, "second", "/g/1.png", (), {"year": "2021"}),
    ]
    with pytest.raises(UsageError, match="image 'second': metadata field 'year' is a string"):
        publish_vectors(tmp_path, fingerprint="f" * 64, image_rows=rows, image_vectors=unit_rows(2))


def strip_metadata_tables(root: Path) -> None:
    """Turn the published version into one written before metadata existed (and re-sign it)."""
    directory = version_dir(root, (root / "CURRENT").read_text().strip())
    connection = sqlite3.connect(directory / "metadata.sqlite")
    for table in ("image_fields", "image_metadata", "image_values"):
        connection.execute(f"DROP TABLE {table}")
    connection.commit()
    connection.execute("VACUUM")
    connection.close()
    manifest = read_manifest(directory)
    write_manifest(directory, manifest)


def test_versions_without_metadata_tables_open_and_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [ImageRow(i, f"img-{i}", f"/g/{i}.png", (), {"year": 2000 + i}) for i in range(6)]
    xb = unit_rows(6)
    publish_vectors(tmp_path, fingerprint="f" * 64, image_rows=rows, image_vectors=xb)
    strip_metadata_tables(tmp_path)
    assert verify_version(tmp_path) == []
    with IndexVersion.open(tmp_path, verify=True) as version:
        assert version.metadata_fields == {}
        assert version.image_records([2])[0].metadata == {}
        everything = version.select("images", {})
        _, found = version.search_images(xb[:1], 3, selection=everything)
        assert found[0, 0] == 0
        with pytest.raises(FilterError, match="known fields: none") as info:
            version.select("images", {"year": 2001})
        assert (info.value.field, info.value.known) == ("year", [])
    assert main(["info", str(tmp_path)]) == 0
    assert "metadata     no fields" in capsys.readouterr().out


# ---------------------------------------------------------------------- the CLI
def test_build_help_says_extra_manifest_fields_become_metadata(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["build", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "become filterable metadata" in text
    assert "CSV cells are strings unless the whole column parses as numbers" in text


def test_a_build_keeps_manifest_metadata_and_info_lists_it(
    tiny_vilt_dir: Path, built: BuiltIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = built.gallery
    manifest = write_jsonl(
        tmp_path / "gallery.jsonl",
        [
            {"id": "one", "path": str(spec.folder / spec.good[0]), "album": "x", "year": 2020},
            {"id": "two", "path": str(spec.folder / spec.good[1]), "tags": ["red"], "ok": True},
            {"id": "bad", "path": str(spec.folder / "truncated.png"), "album": "y"},
        ],
    )
    root = tmp_path / "root"
    code = main(["-q", "build", "--model", str(tiny_vilt_dir), "--out", str(root),
                 "--images", str(manifest), "--workers", "0", "--threads", "1"])  # fmt: skip
    assert code == 0
    with IndexVersion.open(root, verify=True) as version:
        assert {name: f.type for name, f in version.metadata_fields.items()} == {
            "album": "string", "ok": "boolean", "tags": "string_list", "year": "number"
        }  # fmt: skip
        assert version.image_by_id("one").metadata == {"album": "x", "year": 2020}  # type: ignore[union-attr]
        selection = version.select("images", {"album": {"in": ["x", "y"]}})
        assert [r.id for r in version.image_records(selection.rows.tolist())] == ["one"]
    capsys.readouterr()
    assert main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "metadata     album (string), ok (boolean), tags (string_list), year (number)" in out


def test_a_manifest_with_a_bad_value_fails_before_encoding(
    tiny_vilt_dir: Path, built: BuiltIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = built.gallery
    manifest = write_jsonl(
        tmp_path / "gallery.jsonl",
        [
            {"path": str(spec.folder / spec.good[0]), "year": 2020},
            {"path": str(spec.folder / spec.good[1]), "year": "2021"},
        ],
    )
    root = tmp_path / "root"
    code = main(["build", "--model", str(tiny_vilt_dir), "--out", str(root),
                 "--images", str(manifest), "--workers", "0"])  # fmt: skip
    assert code == 2
    assert f"error: {manifest}:2: metadata field 'year' is a string" in capsys.readouterr().err
    assert not root.exists()


@pytest.mark.parametrize(
    ("suffix", "value", "message"),
    [
        (".jsonl", "1" + "0" * 400, "metadata field 'year': an integer of 401 digits"),
        (".jsonl", "1" + "0" * 5000, "invalid JSON (Exceeds the limit (4300 digits)"),
        (".csv", "1" + "0" * 400, "metadata field 'year': an integer of 401 digits"),
        (".csv", "1" + "0" * 5000, "metadata field 'year': a number of 5001 characters"),
        (".jsonl", '"\\ud800"', "metadata field 'year': \"\\ud800\" is not valid UTF-8"),
    ],
    ids=[
        "jsonl-400-digits",
        "jsonl-5000-digits",
        "csv-400-digits",
        "csv-5000-digits",
        "jsonl-lone-surrogate",
    ],
)
def test_a_manifest_value_metadata_cannot_hold_is_a_usage_error(
    tiny_vilt_dir: Path,
    built: BuiltIndex,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    suffix: str,
    value: str,
    message: str,
) -> None:
    """Numbers beyond a float's range (or too long for Python to read), text that is not
    UTF-8: a usage error naming the file and line, before anything is built."""
    spec = built.gallery
    first, second = (str(spec.folder / name) for name in spec.good[:2])
    manifest = tmp_path / f"gallery{suffix}"
    if suffix == ".csv":
        manifest.write_text(f"path,year\n{first},2020\n{second},{value}\n")
        line = 3
    else:
        manifest.write_text(
            json.dumps({"path": first, "year": 2020}) + "\n"
            + f'{{"path": {json.dumps(second)}, "year": {value}}}\n'
        )  # fmt: skip
        line = 2
    root = tmp_path / "root"
    code = main(["build", "--model", str(tiny_vilt_dir), "--out", str(root),
                 "--images", str(manifest), "--workers", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: {manifest}:{line}: {message}" in err
    assert "Traceback" not in err
    assert not root.exists()
