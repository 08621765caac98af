"""``python -m indexer`` runs the index CLI (see :mod:`indexer.cli`)."""

import sys

from indexer.cli import main

sys.exit(main())
