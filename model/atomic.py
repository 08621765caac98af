"""Crash-safe writes, shared by the model and the indexer.

- :func:`replace_file`: write a sibling temporary file, flush and fsync it, then
  ``os.replace`` it onto the target, so readers see the old file or the new one;
- :func:`write_atomically`: the same for a whole directory (checkpoints, model exports);
- :func:`fsync_file` / :func:`fsync_dir`: flush a file's data or a directory's entries (a
  rename or a new file in it), for callers that order several steps (``indexer.publish``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMPORARY_MARK = ".tmp-"  # hidden ``.<name>.tmp-<pid>`` siblings, removed after a crash


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replace_file(
    path: Path, mode: str = "w", *, temporary: Path | None = None, fsync: bool = True
) -> Iterator[IO[Any]]:
    """Yield a stream on ``temporary`` (default ``.<name>.tmp-<pid>`` beside ``path``); when the
    block ends cleanly, flush it, fsync it (unless ``fsync=False``) and ``os.replace`` it onto
    ``path``. The temporary is removed if anything fails. The directory entry is not fsynced:
    call :func:`fsync_dir` on ``path.parent`` where the rename must survive a power cut."""
    if temporary is None:
        temporary = path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(temporary, mode, encoding=encoding) as stream:
            yield stream
            stream.flush()
            if fsync:
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` on a fresh sibling directory, then rename it to ``target``.

    An existing ``target`` is replaced only once the new one is complete.
    """
    target = Path(target)
    temporary = target.parent / f".{target.name}{TEMPORARY_MARK}{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    try:
        write(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if target.exists():
        retired = target.parent / f".{target.name}.old{TEMPORARY_MARK}{os.getpid()}"
        if retired.exists():
            shutil.rmtree(retired)
        os.replace(target, retired)
        os.replace(temporary, target)
        shutil.rmtree(retired)
    else:
        os.replace(temporary, target)
    return target
