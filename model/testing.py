"""Tiny random checkpoints for tests: the same files and code paths as a real ViLT, in ~100 KB."""

from __future__ import annotations

from pathlib import Path

from model.backbone import init_vilt_checkpoint

TINY_WORDS = (
    "a an the of and is are to on in at with left right above below near next picture photo image "
    "red green blue yellow purple orange black white grey pink small large big tiny "
    "circle square triangle star cross shape shapes one two three"
).split()


def make_tiny_vilt(out_dir: Path, *, retrieval_head: bool = True, seed: int = 0) -> Path:
    """Write a random-init ViLT (hidden 32, 2 layers, 32x32 images, 16-pixel patches).

    ``retrieval_head=False`` writes a checkpoint without ``rank_output`` (like ViltModel), which
    :class:`model.EarlyInteraction` must refuse.
    """
    path = init_vilt_checkpoint(
        Path(out_dir),
        words=list(TINY_WORDS),
        image_size=32,
        patch_size=16,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        dropout=0.0,
        seed=seed,
    )
    if not retrieval_head:
        from safetensors.torch import load_file, save_file

        weights_file = path / "model.safetensors"
        weights = {
            k: v for k, v in load_file(weights_file).items() if not k.startswith("rank_output")
        }
        save_file(weights, weights_file, metadata={"format": "pt"})
    return path


def make_tiny_demo_models(out_dir: Path) -> Path:
    """``out_dir/teacher`` (a tiny random ViLT) and ``out_dir/decomposed`` (the same weights as
    a VLDeformer checkpoint): the layout of the demo models, for benchmark smoke runs."""
    from model.modeling import VLDeformer

    teacher = make_tiny_vilt(Path(out_dir) / "teacher")
    VLDeformer.from_pretrained(teacher).save_pretrained(Path(out_dir) / "decomposed")
    return Path(out_dir)
