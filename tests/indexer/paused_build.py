"""Run ``vldeformer-index`` in this process, stopping for good as it is about to replace CURRENT.

``python -m tests.indexer.paused_build MARKER -- <vldeformer-index arguments>``

The pause is a test double installed here (``os.replace`` onto ``CURRENT`` never returns), not
a flag of the indexer: when ``MARKER`` holds the path of the CURRENT temp file, the version
directory has been renamed into place and CURRENT is about to move, and the test kills the
process there.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from indexer.cli import main as indexer_main
from indexer.store import CURRENT_FILE


def main(argv: list[str]) -> int:
    marker, separator, *indexer_args = argv
    assert separator == "--", f"usage: MARKER -- <vldeformer-index arguments>, got {argv}"
    real_replace = os.replace

    def replace_or_pause(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        if Path(target).name == CURRENT_FILE:
            Path(marker).write_text(f"{source}\n", encoding="utf-8")  # the newline ends it
            while True:
                time.sleep(60)
        real_replace(source, target, *args, **kwargs)

    os.replace = replace_or_pause
    return indexer_main(indexer_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
