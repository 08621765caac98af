"""The ViLT backbone: loading checkpoints with clear errors, and creating fresh ones.

Real users load Hugging Face ViLT directories (``dandelin/vilt-b32-finetuned-coco``…).
On machines without the model hub the project creates its own small ViLT from scratch
(:func:`init_vilt_checkpoint`): a word-level WordPiece vocabulary, a ``ViltConfig`` sized for
the CPU, random weights, saved in exactly the layout of a real checkpoint so that every later
step takes the same code path a downloaded checkpoint would.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BertTokenizer,
    PreTrainedTokenizerBase,
    ViltConfig,
    ViltForImageAndTextRetrieval,
)
from transformers.utils import is_torchvision_available
from transformers.utils import logging as hf_logging

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class CheckpointError(ValueError):
    """A model directory that is not a usable ViLT / VLDeformer checkpoint."""


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars; our errors say what matters."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def image_processor_class() -> Any:
    """ViLT's image processor: the torchvision backend when installed, else the PIL one."""
    if is_torchvision_available():
        from transformers.models.vilt import ViltImageProcessor

        return ViltImageProcessor
    from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

    return ViltImageProcessorPil


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {str(device)!r} requested but CUDA is not available here")
    return resolved


def load_vilt_config(path_or_id: str | Path) -> ViltConfig:
    """Load and check a checkpoint's config: it must exist and describe a ViLT model."""
    path = Path(path_or_id)
    if path.exists() and not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} is not a model directory: expected a config.json (a Hugging Face ViLT "
            f"checkpoint), found {sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else 'a file'}"
        )
    try:
        config = AutoConfig.from_pretrained(str(path_or_id))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read the model config of {path_or_id}: {exc}") from exc
    if config.model_type != "vilt":
        raise CheckpointError(
            f"{path_or_id} holds a {config.model_type!r} model; expected a ViLT checkpoint "
            "(config.model_type 'vilt', e.g. dandelin/vilt-b32-finetuned-coco)"
        )
    return config


def load_tokenizer(path_or_id: str | Path) -> PreTrainedTokenizerBase:
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path_or_id))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot load the tokenizer of {path_or_id} (expected tokenizer files such as "
            f"vocab.txt / tokenizer.json next to config.json): {exc}"
        ) from exc


def load_image_processor(path_or_id: str | Path) -> Any:
    """The checkpoint's ViLT image processor (torchvision backend when installed, else PIL)."""
    try:
        with quiet_transformers():
            return image_processor_class().from_pretrained(str(path_or_id))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot load the image processor of {path_or_id} (expected preprocessor_config.json): {exc}"
        ) from exc


def check_loading_info(
    path_or_id: str | Path, info: dict[str, Any], allowed_missing: tuple[str, ...] = ()
) -> None:
    """Fail when weights the model needs were absent from the checkpoint (not silently random)."""
    missing = [key for key in info.get("missing_keys", []) if not key.startswith(allowed_missing)]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise CheckpointError(
            f"{path_or_id}: the checkpoint's weights do not match a ViLT model: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''} "
            f"({len(missing)} in all), mismatched shapes {list(mismatched)[:5]}"
        )


def build_word_tokenizer(words: list[str]) -> BertTokenizer:
    """A lower-casing BERT WordPiece tokenizer whose vocabulary is exactly ``words`` (+ specials).

    Single characters are added too, so an unseen word splits into characters instead of ``[UNK]``.
    """
    characters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
    pieces = [f"##{c}" for c in characters]
    vocab = list(dict.fromkeys([*SPECIAL_TOKENS, *characters, *pieces, *sorted(set(words))]))
    # transformers 5 builds a fast tokenizer from an in-memory vocabulary (vocab_file is ignored).
    return BertTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        do_lower_case=True,
        model_max_length=40,
    )


def init_vilt_checkpoint(
    out_dir: Path,
    *,
    words: list[str],
    image_size: int,
    patch_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_text_len: int = 40,
    dropout: float = 0.0,
    seed: int = 0,
) -> Path:
    """Write a fresh, randomly initialised ViLT checkpoint with an image-text retrieval head.

    The directory has the layout of a real Hugging Face checkpoint (config.json,
    model.safetensors, tokenizer files, preprocessor_config.json), so it loads through
    :meth:`model.VLDeformer.from_pretrained` and :meth:`model.EarlyInteraction.from_pretrained`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(words)
    config = ViltConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        image_size=image_size,
        patch_size=patch_size,
        max_position_embeddings=max_text_len,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=tokenizer.pad_token_id,
        # BERT's 0.02 suits width 768; at small widths it leaves the [CLS] output (and so the
        # matching score) almost independent of the input, and training stalls at chance.
        # 1/sqrt(width) keeps attention input-dependent from the first step.
        initializer_range=hidden_size**-0.5,
    )
    torch.manual_seed(seed)
    network = ViltForImageAndTextRetrieval(config)
    with quiet_transformers():
        network.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # size_divisor = patch size keeps every padded edge a whole number of patches.
    processor = image_processor_class()(size={"shortest_edge": image_size}, size_divisor=patch_size)
    processor.save_pretrained(out_dir)
    return out_dir
