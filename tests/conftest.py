"""Shared fixtures. Tests never touch the network: the hub is switched off before any import."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

# One thread: the tiny test models gain nothing from more, and CI shares its 2 cores with
# the test subprocesses (uvicorn, the indexer), where oversubscription costs 10x.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_vilt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init ViLT checkpoint with a retrieval head, in the real HF layout."""
    from model.testing import make_tiny_vilt

    return make_tiny_vilt(tmp_path_factory.mktemp("tiny_vilt"))
