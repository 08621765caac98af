"""Readers on generated fixtures of each format, their errors, sampling and batching."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from model import VLDeformer
from model.data import (
    IMAGE_KEYS,
    KARPATHY_TRAIN_SPLITS,
    TEXT_KEYS,
    DatasetFormatError,
    MissingImageError,
    OneCaptionPerImageSampler,
    Pair,
    PairDataset,
    collate_pairs,
    group_by_image,
    one_caption_per_image,
    read_coco_captions,
    read_jsonl,
    read_karpathy,
    read_pairs,
)
from model.images import CorruptImageError
from model.loss import ContrastiveLoss, contrastive_step


def _image(path: Path, size: tuple[int, int] = (40, 32), color: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _write_json(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document, indent=1), encoding="utf-8")
    return path


def _karpathy_document() -> dict[str, Any]:
    def record(filepath: str, filename: str, split: str, cocoid: int, n: int) -> dict[str, Any]:
        sentences = [{"raw": f"caption {i} of {filename} ", "tokens": []} for i in range(n)]
        return {
            "filepath": filepath,
            "filename": filename,
            "split": split,
            "cocoid": cocoid,
            "imgid": cocoid,
            "sentences": sentences,
        }

    return {
        "dataset": "coco",
        "images": [
            record("val2014", "a.jpg", "test", 11, 2),
            record("train2014", "b.jpg", "train", 22, 3),
            record("val2014", "c.jpg", "restval", 33, 1),
            record("val2014", "d.jpg", "val", 44, 2),
        ],
    }


@pytest.fixture
def karpathy_file(tmp_path: Path) -> Path:
    for name in ("val2014/a.jpg", "train2014/b.jpg", "val2014/c.jpg", "val2014/d.jpg"):
        _image(tmp_path / name)
    return _write_json(tmp_path / "dataset_coco.json", _karpathy_document())


# ---------------------------------------------------------------------------- Karpathy


def test_read_karpathy_all_and_by_split(karpathy_file: Path) -> None:
    pairs = read_karpathy(karpathy_file)
    assert len(pairs) == 8
    assert pairs[0] == Pair(
        karpathy_file.parent / "val2014/a.jpg", "caption 0 of a.jpg", "11", "test"
    )
    assert [p.image_id for p in pairs] == ["11", "11", "22", "22", "22", "33", "44", "44"]

    test = read_karpathy(karpathy_file, "test")
    assert [p.caption for p in test] == ["caption 0 of a.jpg", "caption 1 of a.jpg"]
    train = read_karpathy(karpathy_file, KARPATHY_TRAIN_SPLITS)
    assert {p.split for p in train} == {"train", "restval"} and len(train) == 4
    assert read_pairs(karpathy_file, split="val") == read_karpathy(karpathy_file, "val")


def test_read_karpathy_flickr_layout_and_images_dir(tmp_path: Path) -> None:
    images_dir = tmp_path / "flickr30k-images"
    _image(images_dir / "1000.jpg")
    document = {"images": [{"filename": "1000.jpg", "split": "train", "sentences": [{"raw": "x"}]}]}
    (tmp_path / "ann").mkdir()
    path = _write_json(tmp_path / "ann" / "dataset_flickr30k.json", document)
    with pytest.raises(MissingImageError, match=r"images\[0\] \(filename '1000.jpg'\)"):
        read_karpathy(path)  # not next to the JSON
    (pair,) = read_karpathy(path, images_dir=images_dir)
    assert pair == Pair(images_dir / "1000.jpg", "x", "1000", "train")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["images"][1].pop("sentences"),
            r"images\[1\] \(filename 'b.jpg'\): expected 'sentences' to be a non-empty list, found None",
        ),
        (
            lambda d: d["images"][2].update(sentences=[]),
            r"images\[2\] .*non-empty list, found \[\]",
        ),
        (
            lambda d: d["images"][0]["sentences"][1].update(raw=7),
            r"images\[0\] \(filename 'a.jpg'\)\.sentences\[1\]: expected 'raw' to be a string, found 7",
        ),
        (
            lambda d: d["images"][3]["sentences"][0].update(raw="  "),
            r"sentences\[0\]: expected 'raw' to be a non-empty caption",
        ),
        (
            lambda d: d["images"][1].pop("filename"),
            r"images\[1\]: expected 'filename' to be a string, found nothing \(key missing\)",
        ),
        (
            lambda d: d["images"].__setitem__(2, "c.jpg"),
            r"images\[2\]: expected an object, found 'c.jpg'",
        ),
        (lambda d: d.__setitem__("images", {}), r"expected a Karpathy split file"),
    ],
)
def test_karpathy_broken_records(tmp_path: Path, mutate: Any, message: str) -> None:
    document = _karpathy_document()
    mutate(document)
    path = _write_json(tmp_path / "dataset_coco.json", document)
    with pytest.raises(DatasetFormatError, match=message) as info:
        read_pairs(path, check_files=False)
    assert str(path) in str(info.value)


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "dataset_coco.json"
    path.write_text('{"images": [\n  {"filename": "a.jpg",\n  oops}\n]}', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=rf"{path}: invalid JSON at line 3, column 3"):
        read_karpathy(path)


def test_missing_image_names_file_and_record(karpathy_file: Path) -> None:
    (karpathy_file.parent / "val2014/d.jpg").unlink()
    with pytest.raises(MissingImageError) as info:
        read_karpathy(karpathy_file)
    message = str(info.value)
    assert str(karpathy_file) in message and "images[3] (filename 'd.jpg')" in message
    assert str(karpathy_file.parent / "val2014/d.jpg") in message
    assert len(read_karpathy(karpathy_file, "train")) == 3  # d.jpg is not in that split
    assert len(read_karpathy(karpathy_file, check_files=False)) == 8


def test_unknown_split_lists_available(karpathy_file: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"no records of split \['dev'\]; the file has \['restval', 'test', 'train', 'val'\]",
    ):
        read_karpathy(karpathy_file, "dev")


# ------------------------------------------------------------------------------- COCO


def _coco_document() -> dict[str, Any]:
    return {
        "info": {},
        "images": [
            {"id": 9, "file_name": "COCO_val2014_9.jpg", "width": 40, "height": 32},
            {"id": 3, "file_name": "COCO_val2014_3.jpg", "width": 40, "height": 32},
            {"id": 5, "file_name": "COCO_val2014_5.jpg", "width": 40, "height": 32},
        ],
        "annotations": [
            {"id": 1, "image_id": 3, "caption": "three first"},
            {"id": 2, "image_id": 9, "caption": "nine first\n"},
            {"id": 3, "image_id": 3, "caption": "three second"},
        ],
    }


def test_read_coco_captions(tmp_path: Path) -> None:
    images_dir = tmp_path / "val2014"
    for image_id in (9, 3, 5):
        _image(images_dir / f"COCO_val2014_{image_id}.jpg")
    path = _write_json(tmp_path / "captions_val2014.json", _coco_document())
    pairs = read_coco_captions(path, images_dir)
    # Image order of images[], annotation order within an image; image 5 has no caption.
    assert [(p.image_id, p.caption) for p in pairs] == [
        ("9", "nine first"),
        ("3", "three first"),
        ("3", "three second"),
    ]
    assert pairs[0].image_path == images_dir / "COCO_val2014_9.jpg" and pairs[0].split == ""
    assert read_pairs(path, images_dir=images_dir) == pairs
    with pytest.raises(ValueError, match="pass images_dir"):
        read_pairs(path)
    with pytest.raises(ValueError, match="has no splits"):
        read_pairs(path, split="train", images_dir=images_dir)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["annotations"][2].update(image_id=77),
            r"annotations\[2\] \(image_id 77\): expected an image_id listed in 'images', found 77",
        ),
        (
            lambda d: d["annotations"][1].pop("caption"),
            r"annotations\[1\] \(image_id 9\): expected 'caption' to be a string, found nothing",
        ),
        (
            lambda d: d["annotations"][0].update(image_id="3"),
            r"annotations\[0\]: expected 'image_id' to be an integer, found '3'",
        ),
        (
            lambda d: d["images"][2].update(id=9),
            r"images\[2\]: image id 9 already used by images\[0\]",
        ),
        (
            lambda d: d["images"][1].pop("file_name"),
            r"images\[1\]: expected 'file_name' to be a string",
        ),
        (
            lambda d: d.__setitem__("annotations", None),
            r"expected 'annotations' to be a list, found None",
        ),
    ],
)
def test_coco_broken_records(tmp_path: Path, mutate: Any, message: str) -> None:
    document = _coco_document()
    mutate(document)
    path = _write_json(tmp_path / "captions_val2014.json", document)
    with pytest.raises(DatasetFormatError, match=message) as info:
        read_coco_captions(path, tmp_path, check_files=False)
    assert str(path) in str(info.value)


def test_coco_missing_image(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "captions_val2014.json", _coco_document())
    with pytest.raises(
        MissingImageError,
        match=r"annotations\[1\] \(image_id 9\): image file .*COCO_val2014_9.jpg does not exist",
    ):
        read_coco_captions(path, tmp_path)


# ------------------------------------------------------------------------------ JSONL


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_jsonl(tmp_path: Path) -> None:
    _image(tmp_path / "data" / "imgs" / "one.png")
    absolute = _image(tmp_path / "elsewhere" / "two.png")
    path = _write_lines(
        tmp_path / "data" / "pairs.jsonl",
        [
            json.dumps({"image": "imgs/one.png", "caption": "first"}),
            "",
            json.dumps(
                {"image": str(absolute), "caption": " second ", "image_id": 2, "split": "val"}
            ),
        ],
    )
    pairs = read_jsonl(path)
    assert pairs == [
        Pair(tmp_path / "data/imgs/one.png", "first", "imgs/one.png", ""),
        Pair(absolute, "second", "2", "val"),
    ]
    assert read_pairs(path, split="val") == pairs[1:]
    other_root = tmp_path / "root"
    _image(other_root / "imgs" / "one.png")
    assert read_jsonl(path, images_dir=other_root)[0].image_path == other_root / "imgs/one.png"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"image": "a.png", "caption": ', r"line 3: expected a JSON object, found invalid JSON"),
        ('["a.png", "caption"]', r"line 3: expected a JSON object, found \['a.png', 'caption'\]"),
        (
            '{"image": "a.png"}',
            r"line 3: expected 'caption' to be a string, found nothing \(key missing\)",
        ),
        (
            '{"image": "a.png", "caption": ""}',
            r"line 3: expected 'caption' to be a non-empty caption, found ''",
        ),
        ('{"image": 5, "caption": "x"}', r"line 3: expected 'image' to be a string, found 5"),
        (
            '{"image": "a.png", "caption": "x", "split": 1}',
            r"line 3: expected 'split' to be a string",
        ),
        (
            '{"image": "a.png", "caption": "x", "image_id": [1]}',
            r"line 3: expected 'image_id' to be a string or integer",
        ),
    ],
)
def test_jsonl_broken_line(tmp_path: Path, bad_line: str, message: str) -> None:
    good = json.dumps({"image": "a.png", "caption": "fine"})
    path = _write_lines(tmp_path / "pairs.jsonl", [good, good, bad_line, good])
    with pytest.raises(DatasetFormatError, match=message) as info:
        read_jsonl(path, check_files=False)
    assert str(path) in str(info.value)


def test_jsonl_missing_image_names_line(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    path = _write_lines(
        tmp_path / "pairs.jsonl",
        [
            json.dumps({"image": "a.png", "caption": "x"}),
            json.dumps({"image": "gone.png", "caption": "y"}),
        ],
    )
    with pytest.raises(
        MissingImageError,
        match=rf"{path}, line 2: image file {tmp_path / 'gone.png'} does not exist",
    ):
        read_pairs(path)


def test_read_pairs_rejects_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match=r"found extension '\.csv'"):
        read_pairs(tmp_path / "pairs.csv")
    path = _write_json(tmp_path / "other.json", {"categories": []})
    with pytest.raises(DatasetFormatError, match=r"found \['categories'\]"):
        read_pairs(path)


# ---------------------------------------------------------------- grouping and sampling


def _interleaved_pairs() -> list[Pair]:
    return [
        Pair(Path("b.jpg"), "b0", "b", "train"),
        Pair(Path("a.jpg"), "a0", "a", "train"),
        Pair(Path("b.jpg"), "b1", "b", "train"),
        Pair(Path("c.jpg"), "c0", "c", "train"),
        Pair(Path("a.jpg"), "a1", "a", "train"),
        Pair(Path("b.jpg"), "b2", "b", "train"),
    ]


def test_group_by_image() -> None:
    image_paths, captions, caption_to_image = group_by_image(_interleaved_pairs())
    assert image_paths == [Path("b.jpg"), Path("a.jpg"), Path("c.jpg")]
    assert captions == ["b0", "b1", "b2", "a0", "a1", "c0"]
    assert caption_to_image.dtype == np.int64
    assert caption_to_image.tolist() == [0, 0, 0, 1, 1, 2]


def test_one_caption_per_image_and_sampler() -> None:
    pairs = _interleaved_pairs()
    chosen = one_caption_per_image(pairs, np.random.default_rng(0))
    assert [pairs[i].image_path.name for i in chosen] == ["b.jpg", "a.jpg", "c.jpg"]
    seen = {
        int(i)
        for seed in range(50)
        for i in one_caption_per_image(pairs, np.random.default_rng(seed))
    }
    assert seen == set(range(len(pairs)))  # every caption gets its turn

    sampler = OneCaptionPerImageSampler(pairs, seed=3)
    assert len(sampler) == 3
    draws = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        epoch_indices = list(sampler)
        assert sorted(pairs[i].image_id for i in epoch_indices) == ["a", "b", "c"]
        assert epoch_indices == list(sampler)  # a function of (seed, epoch)
        draws.append(tuple(epoch_indices))
    assert len(set(draws)) > 1


# ------------------------------------------------------------------ dataset and batching


@pytest.fixture(scope="module")
def tiny_model(tiny_vilt_dir: Path) -> VLDeformer:
    return VLDeformer.from_pretrained(tiny_vilt_dir)


def test_pair_dataset_and_collate(tmp_path: Path, tiny_model: VLDeformer) -> None:
    pairs = [
        Pair(_image(tmp_path / "wide.png", (64, 40), "blue"), "a red circle", "w", ""),
        Pair(_image(tmp_path / "tall.png", (20, 50)), "one two three " * 10, "t", ""),
        Pair(_image(tmp_path / "square.png", (32, 32)), "a", "s", ""),
    ]
    dataset = PairDataset(pairs, tiny_model.tokenizer, tiny_model.image_processor, max_text_len=8)
    assert len(dataset) == 3
    item = dataset[0]
    assert item["index"] == 0
    assert item["pixel_values"].dtype == np.float32 and item["pixel_values"].shape[0] == 3
    expected_ids = tiny_model.tokenizer("a red circle")["input_ids"]
    assert item["input_ids"].tolist() == expected_ids
    assert len(dataset[1]["input_ids"]) == 8  # truncated

    pad = tiny_model.tokenizer.pad_token_id
    batch = collate_pairs([dataset[i] for i in range(3)], pad_token_id=pad)
    heights = [dataset[i]["pixel_values"].shape[1] for i in range(3)]
    widths = [dataset[i]["pixel_values"].shape[2] for i in range(3)]
    assert batch["pixel_values"].shape == (3, 3, max(heights), max(widths))
    assert batch["pixel_mask"].dtype == torch.long
    assert batch["pixel_mask"].sum(dim=(1, 2)).tolist() == [
        h * w for h, w in zip(heights, widths, strict=True)
    ]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 8)
    assert batch["attention_mask"].sum(1).tolist() == [len(expected_ids), 8, 3]
    assert (batch["input_ids"][2, 3:] == pad).all()
    assert batch["index"].tolist() == [0, 1, 2]
    assert set(batch) == {*TEXT_KEYS, *IMAGE_KEYS, "index"}

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, collate_fn=partial(collate_pairs, pad_token_id=pad)
    )
    assert [b["index"].tolist() for b in loader] == [[0, 1], [2]]


def test_pair_dataset_names_undecodable_image(tmp_path: Path, tiny_model: VLDeformer) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(_image(tmp_path / "ok.png").read_bytes()[:60])  # truncated PNG
    dataset = PairDataset(
        [Pair(broken, "x", "b", "")], tiny_model.tokenizer, tiny_model.image_processor
    )
    with pytest.raises(CorruptImageError, match=rf"{broken} \(pair 0\)"):
        dataset[0]
    with pytest.raises(ValueError, match="max_text_len"):
        PairDataset([], tiny_model.tokenizer, tiny_model.image_processor, max_text_len=1)


def test_collated_batch_drives_contrastive_step(tmp_path: Path, tiny_vilt_dir: Path) -> None:
    """The trainer's path: PairDataset -> collate_pairs -> contrastive_step on VLDeformer."""
    model = VLDeformer.from_pretrained(tiny_vilt_dir)
    model.train()
    colors = ["red", "green", "blue", "white"]
    pairs = [
        Pair(_image(tmp_path / f"{c}.png", (32 + 16 * (i % 2), 32), c), f"a {c} square", c, "")
        for i, c in enumerate(colors)
    ]
    dataset = PairDataset(pairs, model.tokenizer, model.image_processor)
    batch = collate_pairs([dataset[i] for i in range(4)], model.tokenizer.pad_token_id)
    text_inputs = {key: batch[key] for key in TEXT_KEYS}
    image_inputs = {key: batch[key] for key in IMAGE_KEYS}
    loss_fn = ContrastiveLoss(temperature=0.05)

    def step(micro_batch_size: int | None) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = contrastive_step(
            model.encode_tokens,
            model.encode_pixels,
            text_inputs,
            image_inputs,
            loss_fn,
            micro_batch_size,
        )
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return loss.item(), grads

    whole_loss, whole = step(None)
    micro_loss, micro = step(2)
    assert whole_loss == pytest.approx(micro_loss, rel=1e-5)
    assert len(whole) == len(micro) > 0
    for a, b in zip(whole, micro, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
