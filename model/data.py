"""Caption datasets: readers for the common formats, a training dataset and batching.

Readers turn a file into a list of :class:`Pair` (one per caption); the parsing itself is
:mod:`model.captions`, shared with the indexer. They fail with :class:`DatasetFormatError`
naming the file and the line (JSONL) or record (JSON), and what was expected and found;
:class:`MissingImageError` names the image file and its record. Blank captions are errors.

- :func:`read_karpathy`: ``dataset_coco.json`` / ``dataset_flickr30k.json`` (Karpathy splits)
- :func:`read_coco_captions`: ``captions_*.json`` from the COCO release
- :func:`read_jsonl`: one ``{"image": path, "caption": text}`` object per line
- :func:`read_pairs`: any of the three, detected from the extension and content

:class:`PairDataset` decodes and preprocesses with the checkpoint's own tokenizer and image
processor; :func:`collate_pairs` pads a batch. Contrastive training treats the other captions
of a batch as negatives, so two captions of one image must not share a batch:
:class:`OneCaptionPerImageSampler` draws one caption per image per epoch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from model.captions import (
    CaptionFormatError,
    CaptionRecord,
    detect_json_format,
    parse_coco,
    parse_karpathy,
    parse_pair_jsonl,
    select_splits,
)
from model.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    collate_pixels,
    open_image,
    preprocess_image,
)

logger = logging.getLogger(__name__)

# Splits of the Karpathy files. The usual training set ("113k" COCO images) is train + restval.
KARPATHY_SPLITS: tuple[str, ...] = ("train", "restval", "val", "test")
KARPATHY_TRAIN_SPLITS: tuple[str, ...] = ("train", "restval")

# ViLT's text position embeddings stop at 40 tokens (its config's max_position_embeddings).
DEFAULT_MAX_TEXT_LEN = 40

# Keys of a collated batch, grouped by the encoder that takes them as keyword arguments
# (``VLDeformer.encode_tokens`` / ``encode_pixels``; see ``model.loss.contrastive_step``).
TEXT_KEYS: tuple[str, ...] = ("input_ids", "attention_mask")
IMAGE_KEYS: tuple[str, ...] = ("pixel_values", "pixel_mask")


class DatasetFormatError(ValueError):
    """A dataset file that does not hold what its format promises; the message says where."""


class MissingImageError(DatasetFormatError):
    """A record names an image file that does not exist."""


@dataclass(frozen=True)
class Pair:
    """One caption of one image.

    ``image_id`` is unique per image within a file (the COCO id where the file has one);
    ``split`` is the record's split name, ``""`` when the format carries none (COCO captions
    files, JSONL records without a ``"split"`` key).
    """

    image_path: Path
    caption: str
    image_id: str
    split: str


# ---------------------------------------------------------------------------- readers


def read_karpathy(
    path: str | Path,
    split: str | Collection[str] | None = None,
    *,
    images_dir: str | Path | None = None,
    check_files: bool = True,
) -> list[Pair]:
    """Read a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``).

    Each ``images[]`` record gives ``filename``, an optional ``filepath`` (COCO:
    ``train2014`` / ``val2014``), ``split`` and ``sentences[].raw``; the image lies at
    ``<images_dir or the JSON's folder>/<filepath>/<filename>``. ``split`` keeps the records
    of one split name or a collection of them (e.g. :data:`KARPATHY_TRAIN_SPLITS`); ``None``
    keeps all. Returns one :class:`Pair` per sentence, image by image in file order.
    """
    path = Path(path)
    return _karpathy_pairs(path, _load_json(path), split, images_dir, check_files)


def read_coco_captions(
    path: str | Path, images_dir: str | Path, *, check_files: bool = True
) -> list[Pair]:
    """Read a COCO captions file (``annotations/captions_train2014.json``).

    ``images[]`` map ``id`` to ``file_name`` (relative to ``images_dir``); ``annotations[]``
    give ``image_id`` and ``caption``. Pairs come image by image in the order of
    ``images[]`` (annotation order within an image); images without captions are skipped.
    The format carries no split, so every pair's ``split`` is ``""``.
    """
    path = Path(path)
    return _coco_pairs(path, _load_json(path), Path(images_dir), check_files)


def read_jsonl(
    path: str | Path,
    split: str | Collection[str] | None = None,
    *,
    images_dir: str | Path | None = None,
    check_files: bool = True,
) -> list[Pair]:
    """Read a JSONL file of ``{"image": path, "caption": text}`` objects, one per line.

    Optional keys: ``"image_id"`` (defaults to the ``"image"`` string) and ``"split"``
    (defaults to ``""``; ``split`` filters on it like :func:`read_karpathy`). Relative image
    paths resolve against ``images_dir``, by default the JSONL file's folder. Blank lines are
    skipped; line numbers in errors count from 1.
    """
    path = Path(path)
    with _dataset_errors():
        records = select_splits(path, parse_pair_jsonl(path), split)
    return _pairs(path, records, _image_root(path, images_dir), check_files)


def read_pairs(
    path: str | Path,
    split: str | Collection[str] | None = None,
    images_dir: str | Path | None = None,
    *,
    check_files: bool = True,
) -> list[Pair]:
    """Read any supported caption file, choosing the reader from its extension and content.

    ``.jsonl`` is JSONL; a ``.json`` object with ``images`` and ``annotations`` is COCO
    captions (``images_dir`` required) and any other object with an ``images`` list is read
    as Karpathy (whose records must then have ``sentences``). ``split`` applies to formats
    that carry splits (Karpathy, JSONL).
    """
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return read_jsonl(path, split, images_dir=images_dir, check_files=check_files)
    if path.suffix.lower() != ".json":
        raise DatasetFormatError(
            f"{path}: expected a .json (Karpathy or COCO captions) or .jsonl file, "
            f"found extension {path.suffix!r}"
        )
    document = _load_json(path)
    with _dataset_errors():
        json_format = detect_json_format(path, document)
    if json_format == "karpathy":
        return _karpathy_pairs(path, document, split, images_dir, check_files)
    if images_dir is None:
        raise ValueError(
            f"{path} is a COCO captions file, whose file names are relative to the image "
            "folder: pass images_dir"
        )
    if split is not None:
        raise ValueError(f"{path} is a COCO captions file, which has no splits: got {split!r}")
    return _coco_pairs(path, document, Path(images_dir), check_files)


def _karpathy_pairs(
    path: Path,
    document: Any,
    split: str | Collection[str] | None,
    images_dir: str | Path | None,
    check_files: bool,
) -> list[Pair]:
    with _dataset_errors():
        records = select_splits(path, parse_karpathy(path, document), split)
    return _pairs(path, records, _image_root(path, images_dir), check_files)


def _coco_pairs(path: Path, document: Any, images_dir: Path, check_files: bool) -> list[Pair]:
    with _dataset_errors():
        records = parse_coco(path, document, image_order=True)
    return _pairs(path, records, images_dir, check_files)


def _load_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc


@contextmanager
def _dataset_errors() -> Iterator[None]:
    """The shared parser's errors as :class:`DatasetFormatError`, message unchanged."""
    try:
        yield
    except CaptionFormatError as exc:
        raise DatasetFormatError(str(exc)) from exc


def _image_root(path: Path, images_dir: str | Path | None) -> Path:
    """The folder image paths are relative to: ``images_dir``, else the file's own folder."""
    return Path(images_dir) if images_dir is not None else path.parent


def _pairs(
    path: Path, records: Sequence[CaptionRecord], image_root: Path, check_files: bool
) -> list[Pair]:
    """One :class:`Pair` per record, its image under ``image_root``; with ``check_files``,
    a :class:`MissingImageError` for the first record whose image file does not exist."""
    pairs = [
        Pair(image_root / record.image_file, record.caption, record.image_id, record.split)
        for record in records
    ]
    if check_files:
        checked: set[Path] = set()
        for pair, record in zip(pairs, records, strict=True):
            if pair.image_path in checked:
                continue
            if not pair.image_path.is_file():
                raise MissingImageError(
                    f"{path}, {record.where}: image file {pair.image_path} does not exist"
                )
            checked.add(pair.image_path)
    logger.info(
        "read %d captions of %d images from %s",
        len(pairs),
        len({pair.image_path for pair in pairs}),
        path,
    )
    return pairs


# ------------------------------------------------------------------ grouping and sampling


def group_by_image(pairs: Sequence[Pair]) -> tuple[list[Path], list[str], np.ndarray]:
    """Gallery layout for retrieval evaluation.

    Returns ``image_paths`` (unique, in order of first appearance), ``captions`` ordered
    image by image (each image's captions in their original order; 5 per image in the
    Karpathy files) and ``caption_to_image`` int64 ``(len(captions),)``, the index into
    ``image_paths`` of each caption's image.
    """
    by_image: dict[Path, list[str]] = {}
    for pair in pairs:
        by_image.setdefault(pair.image_path, []).append(pair.caption)
    image_paths = list(by_image)
    captions = [caption for image_captions in by_image.values() for caption in image_captions]
    counts = [len(image_captions) for image_captions in by_image.values()]
    caption_to_image = np.repeat(np.arange(len(image_paths), dtype=np.int64), counts)
    return image_paths, captions, caption_to_image


def one_caption_per_image(pairs: Sequence[Pair], rng: np.random.Generator) -> np.ndarray:
    """Indices into ``pairs`` of one uniformly drawn caption per image, int64, image order."""
    by_image: dict[Path, list[int]] = {}
    for index, pair in enumerate(pairs):
        by_image.setdefault(pair.image_path, []).append(index)
    return np.array([rng.choice(indices) for indices in by_image.values()], dtype=np.int64)


class OneCaptionPerImageSampler(Sampler[int]):
    """Each epoch, one random caption of every image, in random order.

    With in-batch negatives, two captions of one image in a batch would each be pushed away
    from the other's (identical) image; drawing one caption per image per epoch rules that
    out, and over epochs every caption is seen. An epoch therefore has one item per *image*
    (a fifth of the captions for COCO/Flickr). Call :meth:`set_epoch` before each epoch, as
    with ``DistributedSampler``: the draw is a function of ``(seed, epoch)`` only.
    """

    def __init__(self, pairs: Sequence[Pair], seed: int = 0) -> None:
        self._pairs = pairs
        self._seed = seed
        self._epoch = 0
        self._num_images = len({pair.image_path for pair in pairs})

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __len__(self) -> int:
        return self._num_images

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng((self._seed, self._epoch))
        indices = one_caption_per_image(self._pairs, rng)
        return iter(rng.permutation(indices).tolist())


# ------------------------------------------------------------------ dataset and batching


class PairItem(TypedDict):
    """One preprocessed pair, as :class:`PairDataset` returns it (numpy, cheap to pickle)."""

    pixel_values: np.ndarray  # float32 (3, H, W), this image's own size
    input_ids: np.ndarray  # int64 (T,), unpadded, with the special tokens
    attention_mask: np.ndarray  # int64 (T,), all ones
    index: int  # position in the dataset's pairs


class PairDataset(Dataset[PairItem]):
    """Pairs decoded with :func:`model.images.open_image` and preprocessed for the model.

    ``tokenizer`` and ``image_processor`` are the checkpoint's own (``VLDeformer.tokenizer``,
    ``VLDeformer.image_processor``); captions are truncated to ``max_text_len`` tokens.
    Picklable for ``DataLoader`` workers. Batch items with :func:`collate_pairs`. An image
    that cannot be decoded raises its :class:`model.images.ImageError` subclass with the
    file and the pair index in the message.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        tokenizer: Any,
        image_processor: Any,
        max_text_len: int = DEFAULT_MAX_TEXT_LEN,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if max_text_len < 2:
            raise ValueError(
                f"max_text_len must leave room for [CLS] and [SEP], got {max_text_len}"
            )
        self.pairs = list(pairs)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_text_len = max_text_len
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PairItem:
        pair = self.pairs[index]
        try:
            image = open_image(pair.image_path, max_pixels=self.max_pixels)
        except ImageError as exc:  # keep the subclass (and its reason), add the location
            raise type(exc)(f"{pair.image_path} (pair {index}): {exc}") from exc
        encoded = self.tokenizer(pair.caption, truncation=True, max_length=self.max_text_len)
        return PairItem(
            pixel_values=preprocess_image(self.image_processor, image),
            input_ids=np.asarray(encoded["input_ids"], dtype=np.int64),
            attention_mask=np.asarray(encoded["attention_mask"], dtype=np.int64),
            index=index,
        )


def collate_pairs(items: Sequence[PairItem], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of :class:`PairItem` into one batch of tensors.

    Returns ``input_ids`` and ``attention_mask`` int64 ``(B, T)`` (right-padded with
    ``pad_token_id`` / 0 to the longest caption), ``pixel_values`` float32 ``(B, 3, H, W)``
    and ``pixel_mask`` int64 ``(B, H, W)`` (see :func:`model.images.collate_pixels`) and
    ``index`` int64 ``(B,)``. Use ``functools.partial(collate_pairs, pad_token_id=...)`` as a
    ``DataLoader``'s ``collate_fn``; :data:`TEXT_KEYS` / :data:`IMAGE_KEYS` name the
    keyword arguments of the two encoders.
    """
    if not items:
        raise ValueError("collate_pairs needs at least one item")
    length = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(items), length, dtype=torch.long)
    for row, item in enumerate(items):
        tokens = len(item["input_ids"])
        input_ids[row, :tokens] = torch.from_numpy(item["input_ids"])
        attention_mask[row, :tokens] = torch.from_numpy(item["attention_mask"])
    pixel_values, pixel_mask = collate_pixels([item["pixel_values"] for item in items])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "pixel_mask": pixel_mask,
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }
