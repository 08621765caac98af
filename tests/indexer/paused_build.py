"""Run ``vldeformer-index`` in this process and stop it for good at a chosen point, to be killed.

``python -m tests.indexer.paused_build MARKER -- <vldeformer-index arguments>``
    stops as the build is about to replace CURRENT: when ``MARKER`` holds the path of the
    CURRENT temp file, the version directory has been renamed into place and CURRENT is
    about to move.
``python -m tests.indexer.paused_build --after-shards N -- <vldeformer-index arguments>``
    stops after the build has written N embedding shards (mid-encode; with either engine,
    as both write shards from this process).

The pauses are test doubles installed here (``os.replace`` onto ``CURRENT`` or
``ShardStore.write`` never returns), not flags of the indexer; the test kills the process.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from indexer.cli import main as indexer_main
from indexer.shards import ShardStore
from indexer.store import CURRENT_FILE


def _pause_forever() -> None:
    while True:
        time.sleep(60)


def _pause_at_current(marker: str) -> None:
    real_replace = os.replace

    def replace_or_pause(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        if Path(target).name == CURRENT_FILE:
            Path(marker).write_text(f"{source}\n", encoding="utf-8")  # the newline ends it
            _pause_forever()
        real_replace(source, target, *args, **kwargs)

    os.replace = replace_or_pause


def _pause_after_shards(count: int) -> None:
    real_write = ShardStore.write
    written = 0

    def write_then_pause(self: ShardStore, *args: Any, **kwargs: Any) -> None:
        nonlocal written
        real_write(self, *args, **kwargs)
        written += 1
        if written >= count:
            _pause_forever()

    ShardStore.write = write_then_pause  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    separator = argv.index("--")
    point, indexer_args = argv[:separator], argv[separator + 1 :]
    if point[0] == "--after-shards":
        _pause_after_shards(int(point[1]))
    else:
        (marker,) = point
        _pause_at_current(marker)
    return indexer_main(indexer_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
