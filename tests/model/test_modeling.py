"""The decomposed model: loading through the real-checkpoint path, encoders, fingerprints."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from model import CheckpointError, DecomposeSettings, EarlyInteraction, VLDeformer
from model.testing import make_tiny_vilt


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # Different sizes on purpose: batches are padded and the pixel mask must hide the padding.
    return [
        Image.fromarray(rng.integers(0, 255, (24 + 8 * (i % 3), 32 + 4 * i, 3), dtype=np.uint8))
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny_model(tiny_vilt_dir: Path) -> VLDeformer:
    return VLDeformer.from_pretrained(tiny_vilt_dir, device="cpu")


def test_encoders_return_unit_float32_rows(tiny_model: VLDeformer) -> None:
    texts = ["a red circle left of a blue square", "a green star", "zebra xylophone"]
    text_vectors = tiny_model.encode_text(texts)
    image_vectors = tiny_model.encode_images(_images(4))
    assert text_vectors.shape == (3, tiny_model.embedding_dim)
    assert image_vectors.shape == (4, tiny_model.embedding_dim)
    for vectors in (text_vectors, image_vectors):
        assert vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert tiny_model.encode_text([]).shape == (0, tiny_model.embedding_dim)


def test_batched_and_one_by_one_encodings_agree(tiny_model: VLDeformer) -> None:
    images = _images(5)
    texts = ["a red circle", "two blue squares above a small triangle", "one", "a b c", "the star"]
    batched_images = tiny_model.encode_images(images, batch_size=5)
    single_images = np.concatenate([tiny_model.encode_images([image]) for image in images])
    np.testing.assert_allclose(batched_images, single_images, atol=1e-5)
    batched_texts = tiny_model.encode_text(texts, batch_size=5)
    single_texts = np.concatenate([tiny_model.encode_text([text]) for text in texts])
    np.testing.assert_allclose(batched_texts, single_texts, atol=1e-5)


def test_modalities_are_independent(tiny_model: VLDeformer) -> None:
    """The text path never sees images and vice versa: encodings don't depend on the other."""
    text_before = tiny_model.encode_text(["a red circle"])
    image_before = tiny_model.encode_images(_images(1, seed=3))
    tiny_model.encode_images(_images(6, seed=9))
    tiny_model.encode_text(["something else entirely"] * 4)
    # Equal up to float summation order (patches are gathered in a random order by ViLT).
    np.testing.assert_allclose(tiny_model.encode_text(["a red circle"]), text_before, atol=1e-6)
    np.testing.assert_allclose(
        tiny_model.encode_images(_images(1, seed=3)), image_before, atol=1e-6
    )


def test_padding_does_not_change_an_image_encoding(tiny_model: VLDeformer) -> None:
    small, large = _images(2, seed=5)[0], Image.new("RGB", (64, 64), (10, 200, 30))
    alone = tiny_model.encode_images([small])
    with_larger_neighbour = tiny_model.encode_images([small, large])[:1]
    np.testing.assert_allclose(alone, with_larger_neighbour, atol=1e-5)


def test_extreme_aspect_ratios_encode_alone_and_beside_ordinary_images(
    tiny_model: VLDeformer,
) -> None:
    """1xN, Nx1, banners and 1x1 images encode (the processor alone rounds a side to 0), and
    batching them with ordinary images changes nobody's vector."""
    extreme = [
        Image.new("RGB", size, colour)
        for size, colour in [
            ((700, 100), "red"),
            ((256, 10), "blue"),
            ((1, 300), "green"),
            ((300, 1), "white"),
            ((1, 1), "black"),
        ]
    ]
    images = _images(3, seed=11) + extreme
    batched = tiny_model.encode_images(images, batch_size=len(images))
    single = np.concatenate([tiny_model.encode_images([image]) for image in images])
    assert np.isfinite(batched).all()
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_save_load_round_trip_keeps_fingerprint_and_vectors(
    tiny_model: VLDeformer, tmp_path: Path
) -> None:
    out = tiny_model.save_pretrained(tmp_path / "decomposed")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "vldeformer.json"):
        assert (out / name).is_file(), name
    reloaded = VLDeformer.from_pretrained(out)
    assert reloaded.fingerprint == tiny_model.fingerprint
    np.testing.assert_allclose(
        reloaded.encode_text(["a red circle"]), tiny_model.encode_text(["a red circle"]), atol=1e-6
    )
    saved = json.loads((out / "vldeformer.json").read_text())
    assert saved["embedding_dim"] == tiny_model.embedding_dim
    assert saved["fingerprint"] == tiny_model.fingerprint


def test_fingerprint_changes_with_weights(tiny_vilt_dir: Path) -> None:
    model = VLDeformer.from_pretrained(tiny_vilt_dir)
    before = model.fingerprint
    with torch.no_grad():
        model.vilt.pooler.dense.bias.add_(1e-3)
    assert model.compute_fingerprint() != before
    other_seed = VLDeformer.from_pretrained(make_tiny_vilt(tiny_vilt_dir.parent / "seed1", seed=1))
    assert other_seed.fingerprint != before


def test_not_vilt_and_broken_weights_fail_clearly(tiny_vilt_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        VLDeformer.from_pretrained(tmp_path)

    bert = tmp_path / "bert"
    shutil.copytree(tiny_vilt_dir, bert)
    config = json.loads((bert / "config.json").read_text())
    config["model_type"] = "bert"
    (bert / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'bert'.*expected a ViLT"):
        VLDeformer.from_pretrained(bert)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_vilt_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00not safetensors at all")
    with pytest.raises(CheckpointError, match="cannot load the ViLT weights"):
        VLDeformer.from_pretrained(corrupt)

    missing_layer = tmp_path / "missing"
    shutil.copytree(tiny_vilt_dir, missing_layer)
    weights = load_file(missing_layer / "model.safetensors")
    kept = {k: v for k, v in weights.items() if "layer.1." not in k}
    save_file(kept, missing_layer / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing .*layer\.1"):
        VLDeformer.from_pretrained(missing_layer)


def test_early_interaction_scores_pairs_and_needs_its_head(
    tiny_vilt_dir: Path, tiny_model: VLDeformer, tmp_path: Path
) -> None:
    teacher = EarlyInteraction.from_pretrained(tiny_vilt_dir)
    images = _images(3)
    scores = teacher.score_pairs(["a red circle", "a blue square", "a star"], images)
    assert scores.shape == (3,) and scores.dtype == np.float32 and np.isfinite(scores).all()
    one_by_one = [
        teacher.score_pairs([t], [i])[0] for t, i in zip(["a red circle"], images[:1], strict=True)
    ]
    np.testing.assert_allclose(scores[:1], one_by_one, atol=1e-5)
    with pytest.raises(ValueError, match="as many texts as images"):
        teacher.score_pairs(["a"], images)

    headless = make_tiny_vilt(tmp_path / "headless", retrieval_head=False)
    with pytest.raises(CheckpointError, match="no image-text retrieval head"):
        EarlyInteraction.from_pretrained(headless)
    decomposed = tiny_model.save_pretrained(tmp_path / "decomposed")
    with pytest.raises(CheckpointError, match="decomposed"):
        EarlyInteraction.from_pretrained(decomposed)


def test_tokenizer_knows_its_words(tiny_model: VLDeformer) -> None:
    """A word-level vocabulary: known words are single tokens, never [UNK]."""
    tokens = tiny_model.tokenizer.tokenize("a red circle left of a blue square")
    assert tokens == ["a", "red", "circle", "left", "of", "a", "blue", "square"]
    red, blue = tiny_model.encode_text(["a red circle", "a blue circle"])
    assert not np.allclose(red, blue)


def test_mean_pooling_is_the_papers_masked_mean_then_tanh(tiny_vilt_dir: Path) -> None:
    cls = VLDeformer.from_pretrained(tiny_vilt_dir)
    mean = VLDeformer.from_pretrained(tiny_vilt_dir)
    mean.settings = dataclasses.replace(mean.settings, pooling="mean")
    texts = ["a red circle", "two blue squares above a small triangle"]
    vectors = mean.encode_text(texts)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors, cls.encode_text(texts), atol=1e-3)
    # The short text padded in a batch with the long one encodes as it does alone: padding
    # positions are left out of the mean.
    np.testing.assert_allclose(vectors[:1], mean.encode_text(texts[:1]), atol=1e-5)
    # By hand: LayerNorm'd hidden states of the text tokens, their mean, tanh, normalised.
    tokens = mean.tokenize(texts[:1])
    with torch.inference_mode():
        embeddings = mean.vilt.embeddings
        hidden = embeddings.text_embeddings(input_ids=tokens["input_ids"])
        hidden = hidden + embeddings.token_type_embeddings(torch.zeros_like(tokens["input_ids"]))
        hidden = mean.vilt.layernorm(mean.vilt.encoder(hidden).last_hidden_state)
        expected = torch.nn.functional.normalize(torch.tanh(hidden.mean(1)), dim=-1)
    np.testing.assert_allclose(vectors[:1], expected.numpy(), atol=1e-5)
    image_vectors = mean.encode_images(_images(3))
    np.testing.assert_allclose(np.linalg.norm(image_vectors, axis=1), 1.0, atol=1e-5)


def test_unknown_pooling_is_refused() -> None:
    with pytest.raises(CheckpointError, match="pooling"):
        DecomposeSettings(pooling="max")
