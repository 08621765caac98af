"""Gallery and caption readers: formats, ids, links, and errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from indexer.cli import main
from indexer.errors import UsageError
from indexer.sources import CaptionInput, link_captions, read_captions, read_gallery


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folder_ids_are_relative_paths_and_non_images_are_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "gallery"
    for name in ("b.JPG", "a.png", "sub/c.webp", "sub/d.svg", "notes.txt", ".hidden.png",
                 ".git/e.png"):  # fmt: skip
        _touch(folder / name)
    gallery = read_gallery(folder)
    assert [image.id for image in gallery.images] == ["a.png", "b.JPG", "sub/c.webp", "sub/d.svg"]
    assert all(image.path.is_absolute() for image in gallery.images)
    assert gallery.ignored_files == 1
    assert gallery.format == "folder"


def test_jsonl_and_csv_manifests_resolve_relative_paths(tmp_path: Path) -> None:
    _touch(tmp_path / "pics" / "one.png")
    jsonl = tmp_path / "gallery.jsonl"
    jsonl.write_text(
        json.dumps({"path": "pics/one.png", "captions": ["a dog", " "], "caption": "a cat"})
        + "\n\n"
        + json.dumps({"id": 7, "path": "/abs/two.png"})
        + "\n"
    )
    images = read_gallery(jsonl).images
    assert [i.id for i in images] == ["pics/one.png", "7"]
    assert images[0].path == (tmp_path / "pics" / "one.png").resolve()
    assert images[0].captions == ("a dog", "a cat")
    assert images[1].path == Path("/abs/two.png")

    csv_file = tmp_path / "gallery.csv"
    csv_file.write_text(
        "id,path,captions\nfirst,pics/one.png,a dog | a small dog\n,pics/two.png,\n"
    )
    images = read_gallery(csv_file).images
    assert [i.id for i in images] == ["first", "pics/two.png"]
    assert images[0].captions == ("a dog", "a small dog")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("g.jsonl", '{"path": "a.png"}\n{"path": "b.png", "id": "a.png"}\n',
         r"g\.jsonl:2: duplicate image id 'a\.png' \(first at .*g\.jsonl:1\)"),
        ("g.jsonl", '{"path": "a.png"}\n{"path": \n', r"g\.jsonl:2: invalid JSON"),
        ("g.jsonl", '{"id": "x"}\n', r"g\.jsonl:1: expected a non-empty string 'path'"),
        ("g.jsonl", '["a.png"]\n', r"g\.jsonl:1: expected a JSON object"),
        ("g.csv", "id,file\nx,a.png\n", r"g\.csv:1: the CSV header must have a 'path' column"),
        ("g.csv", "id,path\nx,a.png\nx,b.png\n", r"g\.csv:3: duplicate image id 'x'"),
        ("g.txt", "a.png\n", r"expected a folder, a \.jsonl or a \.csv manifest"),
    ],
)  # fmt: skip
def test_bad_gallery_manifests_name_file_and_line(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        read_gallery(path)


def test_undecodable_or_malformed_csv_manifests_are_usage_errors_with_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_utf8 = tmp_path / "latin1.csv"
    not_utf8.write_bytes(b"id,path\na,a.png\nb,caf\xe9.png\n")
    with pytest.raises(UsageError, match=r"latin1\.csv:3: not UTF-8 text"):
        read_gallery(not_utf8)
    oversized = tmp_path / "huge.csv"
    oversized.write_text("id,path\na,a.png\nb," + "x" * 200_000 + ".png\n")
    with pytest.raises(UsageError, match=r"huge\.csv:3: malformed CSV \(field larger"):
        read_gallery(oversized)

    # Through the CLI: "error: file:line ...", exit 2, no traceback.
    root = tmp_path / "root"
    argv = ["build", "--model", str(tmp_path), "--out", str(root), "--images", str(not_utf8)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {not_utf8}:3: not UTF-8 text") and "Traceback" not in err


def test_missing_gallery_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such folder"):
        read_gallery(tmp_path / "absent")


def test_caption_formats(tmp_path: Path) -> None:
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(
        '{"caption": "a red circle", "image": "./img/a.png"}\n'
        '{"id": "k", "caption": "  "}\n'
        '{"id": 5, "caption": "a blue square", "image": null}\n'
    )
    corpus = read_captions(jsonl)
    assert [(c.id, c.caption, c.image_ref) for c in corpus.captions] == [
        ("1", "a red circle", "img/a.png"),
        ("5", "a blue square", None),
    ]
    assert [(s.id, s.reason) for s in corpus.skipped] == [("k", "empty_caption")]

    text = tmp_path / "c.txt"
    text.write_text("first caption\n\nthird line caption\n")
    corpus = read_captions(text)
    assert [(c.id, c.caption) for c in corpus.captions] == [
        ("1", "first caption"),
        ("3", "third line caption"),
    ]

    karpathy = tmp_path / "k.json"
    karpathy.write_text(json.dumps({"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test",
         "sentences": [{"raw": "A dog.", "sentid": 10}, {"raw": "A brown dog.", "sentid": 11}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "train",
         "sentences": [{"raw": "A cat.", "sentid": 12}]},
    ]}))  # fmt: skip
    corpus = read_captions(karpathy)
    assert corpus.format == "karpathy"
    assert [(c.id, c.image_ref) for c in corpus.captions] == [
        ("10", "val2014/a.jpg"), ("11", "val2014/a.jpg"), ("12", "val2014/b.jpg"),
    ]  # fmt: skip
    assert [c.id for c in read_captions(karpathy, split="test").captions] == ["10", "11"]

    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "x.jpg"}, {"id": 2, "file_name": "y.jpg"}],
        "annotations": [{"id": 100, "image_id": 2, "caption": "a bus"},
                        {"id": 101, "image_id": 1, "caption": "a tram"}],
    }))  # fmt: skip
    corpus = read_captions(coco)
    assert corpus.format == "coco"
    assert [(c.id, c.caption, c.image_ref) for c in corpus.captions] == [
        ("100", "a bus", "y.jpg"), ("101", "a tram", "x.jpg"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.jsonl", '{"caption": "a"}\n{"caption": 3}\n', r"c\.jsonl:2: expected a string 'caption'"),
        ("c.jsonl", '{"id": "x", "caption": "a"}\n{"id": "x", "caption": "b"}\n',
         r"c\.jsonl:2: duplicate caption id 'x'"),
        ("c.jsonl", '{"caption": "a"}\nnot json\n', r"c\.jsonl:2: invalid JSON"),
        ("c.json", '{"images": [\n{"filename": "a.jpg", "sentences": [{"raw": 1}]}]}',
         r"c\.json:images\[0\] \(filename 'a\.jpg'\)\.sentences\[0\]: expected 'raw' to be a string, found 1"),
        ("c.json", '{"images": [],\n "annotations": [{"image_id": 9, "caption": "x"}]}',
         r"c\.json:annotations\[0\] \(image_id 9\): expected an image_id listed in 'images', found 9"),
        ("c.json", '{"images": [{"id": [1], "file_name": "a.jpg"}], "annotations": []}',
         r"c\.json:images\[0\]: expected 'id' to be a string or integer, found \[1\]"),
        ("c.json", '{"images": [{"id": {"n": 1}, "file_name": "a.jpg"}], "annotations": []}',
         r"c\.json:images\[0\]: expected 'id' to be a string or integer, found \{'n': 1\}"),
        ("c.json", '{"images": [{"id": 1, "file_name": "a.jpg"}],\n'
                   ' "annotations": [{"image_id": [1], "caption": "x"}]}',
         r"c\.json:annotations\[0\]: expected 'image_id' to be a string or integer, found \[1\]"),
        ("c.json", '{"images": 3, "annotations": []}', r"c\.json: expected 'images' to be a list"),
        ("c.json", '{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],'
                   ' "annotations": []}',
         r"c\.json:images\[1\]: image id 1 already used by images\[0\]"),
        ("c.json", '{"images": [{"filename": "a.jpg", "sentences": [{"raw": "x", "sentid": ""}]}]}',
         r"c\.json:images\[0\] \(filename 'a\.jpg'\)\.sentences\[0\]: expected 'sentid' to be a non-empty id"),
        ("c.json", '{"images": [}', r"c\.json:1: invalid JSON"),
        ("c.json", '[1, 2]', r"expected a Karpathy"),
        ("c.csv", "caption\n", r"unknown format '\.csv'"),
    ],
)  # fmt: skip
def test_bad_caption_files_name_file_and_line(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        read_captions(path)


def test_split_only_applies_to_karpathy(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"caption": "a"}\n')
    with pytest.raises(UsageError, match="--split"):
        read_captions(path, split="test")
    coco = tmp_path / "coco.json"
    coco.write_text('{"images": [], "annotations": []}')
    with pytest.raises(UsageError, match=r"--split test only applies to a Karpathy"):
        read_captions(coco, split="test")
    karpathy = tmp_path / "k.json"
    karpathy.write_text(
        '{"images": [{"filename": "a.jpg", "split": "val", "sentences": [{"raw": "x"}]}]}'
    )
    with pytest.raises(UsageError, match=r"k\.json: no records of split \['test'\]; the file has"):
        read_captions(karpathy, split="test")


def test_blank_json_captions_are_skipped_and_string_coco_ids_link(tmp_path: Path) -> None:
    karpathy = tmp_path / "k.json"
    karpathy.write_text(json.dumps({"images": [
        {"filename": "a.jpg", "sentences": [{"raw": " "}, {"raw": "A dog."}]},
        {"filename": "b.jpg", "sentences": []},
    ]}))  # fmt: skip
    corpus = read_captions(karpathy)
    assert [(c.id, c.caption) for c in corpus.captions] == [("0.1", "A dog.")]
    assert [(s.id, s.reason) for s in corpus.skipped] == [("0.0", "empty_caption")]
    assert corpus.skipped[0].detail.startswith(f"{karpathy}:images[0] (filename 'a.jpg')")

    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({
        "images": [{"id": "img-a", "file_name": "./x.jpg"}, {"id": 7, "file_name": "y.jpg"}],
        "annotations": [{"image_id": 7, "caption": "a bus"}, {"image_id": "img-a", "caption": ""},
                        {"image_id": "img-a", "caption": "a tram"}],
    }))  # fmt: skip
    corpus = read_captions(coco)
    assert [(c.id, c.caption, c.image_ref) for c in corpus.captions] == [
        ("0", "a bus", "y.jpg"), ("2", "a tram", "x.jpg"),
    ]  # fmt: skip
    assert [s.id for s in corpus.skipped] == ["1"]


def test_links_match_ids_exactly_or_by_unique_file_name() -> None:
    def caption(ref: str | None) -> CaptionInput:
        return CaptionInput("c", "text", ref, "here")

    ids = ["test_1.png", "a/dup.png", "b/dup.png", "sub/x.jpg"]
    links = link_captions(
        [caption("test_1.png"), caption("images/test_1.png"), caption("dup.png"),
         caption("sub/x.jpg"), caption("missing.png"), caption(None)],
        ids,
    )  # fmt: skip
    assert links == ["test_1.png", "test_1.png", None, "sub/x.jpg", None, None]
