"""The test helpers publish through the indexer's own publishing path, build lock included."""

from __future__ import annotations

from pathlib import Path

import pytest

from indexer.errors import UsageError
from indexer.publish import BuildLock
from indexer.store import read_current
from tests.service.helpers import FakeEncoder, make_gallery


def test_publishing_respects_the_build_lock(tmp_path: Path) -> None:
    root = tmp_path / "index"
    encoder = FakeEncoder()
    with BuildLock(root), pytest.raises(UsageError, match="another build"):
        make_gallery(root, tmp_path / "gallery", encoder)
    assert read_current(root) is None
    gallery = make_gallery(root, tmp_path / "gallery", encoder)  # lock released: publishes
    assert read_current(root) == gallery.version
    assert not list(root.glob(".tmp-*"))
