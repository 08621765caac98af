"""The shared caption-file parser: Karpathy and COCO records, splits, ids and errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from model.captions import (
    CaptionFormatError,
    CaptionRecord,
    detect_json_format,
    parse_coco,
    parse_karpathy,
    parse_pair_jsonl,
    select_splits,
)

PATH = Path("data/captions.json")


def _karpathy() -> dict[str, Any]:
    return {
        "images": [
            {
                "filepath": "val2014",
                "filename": "a.jpg",
                "split": "test",
                "cocoid": 11,
                "sentences": [{"raw": " A dog. ", "sentid": 10}, {"raw": "A brown dog."}],
            },
            {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "A cat."}]},
        ]
    }


def _coco() -> dict[str, Any]:
    return {
        "images": [{"id": 9, "file_name": "nine.jpg"}, {"id": 3, "file_name": "three.jpg"}],
        "annotations": [
            {"id": 100, "image_id": 3, "caption": "three first"},
            {"image_id": 9, "caption": "nine"},
            {"id": "c", "image_id": 3, "caption": "three second"},
        ],
    }


def test_karpathy_records() -> None:
    records = parse_karpathy(PATH, _karpathy())
    assert records == [
        CaptionRecord(
            "A dog.", "10", "11", "val2014/a.jpg", "test", "images[0] (filename 'a.jpg').sentences[0]"
        ),
        CaptionRecord(
            "A brown dog.",
            "0.1",
            "11",
            "val2014/a.jpg",
            "test",
            "images[0] (filename 'a.jpg').sentences[1]",
        ),
        CaptionRecord("A cat.", "1.0", "b", "b.jpg", "train", "images[1] (filename 'b.jpg').sentences[0]"),
    ]  # fmt: skip
    assert detect_json_format(PATH, _karpathy()) == "karpathy"


def test_coco_records_in_file_or_image_order() -> None:
    records = parse_coco(PATH, _coco())
    assert [(r.caption_id, r.caption, r.image_id, r.image_file, r.split) for r in records] == [
        ("100", "three first", "3", "three.jpg", ""),
        ("1", "nine", "9", "nine.jpg", ""),
        ("c", "three second", "3", "three.jpg", ""),
    ]
    assert records[0].where == "annotations[0] (image_id 3)"
    by_image = parse_coco(PATH, _coco(), image_order=True)
    assert [r.caption for r in by_image] == ["nine", "three first", "three second"]
    assert detect_json_format(PATH, _coco()) == "coco"


def test_coco_string_ids_only_when_allowed() -> None:
    document = _coco()
    document["images"][1]["id"] = "three"
    document["annotations"][0]["image_id"] = "three"
    document["annotations"][2]["image_id"] = "three"
    with pytest.raises(
        CaptionFormatError, match=r"images\[1\]: expected 'id' to be an integer, found 'three'"
    ):
        parse_coco(PATH, document)
    records = parse_coco(PATH, document, string_ids=True)
    assert [(r.image_id, r.image_file) for r in records] == [
        ("three", "three.jpg"),
        ("9", "nine.jpg"),
        ("three", "three.jpg"),
    ]
    assert records[0].where == "annotations[0] (image_id 'three')"
    document["annotations"][1]["image_id"] = "9"  # a string is not the integer 9
    with pytest.raises(
        CaptionFormatError,
        match=r"annotations\[1\] \(image_id '9'\): expected an image_id listed in 'images'",
    ):
        parse_coco(PATH, document, string_ids=True)
    document["annotations"][1]["image_id"] = True
    with pytest.raises(
        CaptionFormatError, match=r"'image_id' to be a string or integer, found True"
    ):
        parse_coco(PATH, document, string_ids=True)


def test_blank_captions_are_errors_unless_kept() -> None:
    document = _karpathy()
    document["images"][1]["sentences"][0]["raw"] = "  "
    with pytest.raises(
        CaptionFormatError,
        match=r"images\[1\] \(filename 'b.jpg'\)\.sentences\[0\]: expected 'raw' to be a non-empty caption, found '  '",
    ):
        parse_karpathy(PATH, document)
    assert parse_karpathy(PATH, document, keep_blank=True)[-1].caption == ""

    document["images"][1]["sentences"] = []
    with pytest.raises(CaptionFormatError, match=r"expected 'sentences' to be a non-empty list"):
        parse_karpathy(PATH, document)
    assert len(parse_karpathy(PATH, document, keep_blank=True)) == 2

    coco = _coco()
    coco["annotations"][1]["caption"] = "\n"
    with pytest.raises(
        CaptionFormatError,
        match=r"annotations\[1\] \(image_id 9\): expected 'caption' to be a non-empty",
    ):
        parse_coco(PATH, coco)
    assert parse_coco(PATH, coco, keep_blank=True)[1].caption == ""


@pytest.mark.parametrize(
    ("mutate", "where", "problem"),
    [
        (lambda d: d["images"][1].pop("filename"), "images[1]",
         "expected 'filename' to be a string, found nothing (key missing)"),
        (lambda d: d["images"].__setitem__(0, "a.jpg"), "images[0]", "expected an object, found 'a.jpg'"),
        (lambda d: d["images"][0].update(split=3), "images[0] (filename 'a.jpg')",
         "expected 'split' to be a string, found 3"),
        (lambda d: d["images"][0]["sentences"].__setitem__(1, "text"),
         "images[0] (filename 'a.jpg').sentences[1]", "expected an object with 'raw', found 'text'"),
        (lambda d: d["images"][0]["sentences"][0].update(sentid=[1]),
         "images[0] (filename 'a.jpg').sentences[0]",
         "expected 'sentid' to be a string or integer, found [1]"),
        (lambda d: d.__setitem__("images", None), "", "expected 'images' to be a list, found None"),
    ],
)  # fmt: skip
def test_malformed_karpathy_record_names_its_path(mutate: Any, where: str, problem: str) -> None:
    document = _karpathy()
    mutate(document)
    with pytest.raises(CaptionFormatError) as info:
        parse_karpathy(PATH, document)
    error = info.value
    assert (error.path, error.where, error.problem) == (PATH, where, problem)
    assert str(error) == (f"{PATH}, {where}: {problem}" if where else f"{PATH}: {problem}")


def test_malformed_coco_records_name_their_path() -> None:
    document = _coco()
    document["images"][1]["id"] = 9
    with pytest.raises(
        CaptionFormatError, match=r"images\[1\]: image id 9 already used by images\[0\]"
    ):
        parse_coco(PATH, document)
    document = _coco()
    document["annotations"][2]["image_id"] = 77
    with pytest.raises(CaptionFormatError) as info:
        parse_coco(PATH, document)
    assert info.value.where == "annotations[2] (image_id 77)"
    assert info.value.problem == "expected an image_id listed in 'images', found 77"


def test_unknown_documents_are_refused() -> None:
    with pytest.raises(
        CaptionFormatError, match=r"expected a Karpathy split file .* found \['categories'\]"
    ):
        detect_json_format(PATH, {"categories": []})
    with pytest.raises(CaptionFormatError, match=r"found list"):
        detect_json_format(PATH, [1, 2])


def test_select_splits() -> None:
    records = parse_karpathy(PATH, _karpathy())
    assert select_splits(PATH, records, None) == records
    assert [r.caption for r in select_splits(PATH, records, "train")] == ["A cat."]
    assert len(select_splits(PATH, records, ("train", "test"))) == 3
    with pytest.raises(
        CaptionFormatError,
        match=r"captions\.json: no records of split \['dev', 'val'\]; the file has \['test', 'train'\]",
    ):
        select_splits(PATH, records, ["val", "dev", "train"])


def test_pair_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps({"image": "a.png", "caption": " one "}),
        "",
        json.dumps({"image": "/abs/b.png", "caption": "two", "image_id": 2, "split": "val"}),
        '{"image": "c.png", "caption": 5}',
    ]
    path.write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")
    assert parse_pair_jsonl(path) == [
        CaptionRecord("one", "1", "a.png", "a.png", "", "line 1"),
        CaptionRecord("two", "3", "2", "/abs/b.png", "val", "line 3"),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CaptionFormatError) as info:
        parse_pair_jsonl(path)
    assert str(info.value) == f"{path}, line 4: expected 'caption' to be a string, found 5"
