"""The indexer's error classes: the two ways a build can fail (mapped to the CLI's exit codes
by :mod:`indexer.cli`), and the base class of index-store errors."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad arguments or inputs, found before any encoding starts (exit code 2).

    The message names the offending value: the path, the id, the file and line.
    """


class BuildError(RuntimeError):
    """The build ran but could not produce a version (exit code 1); ``CURRENT`` is untouched."""


class StoreError(Exception):
    """Base class of index-store errors (:mod:`indexer.store`); the message says what and where."""
