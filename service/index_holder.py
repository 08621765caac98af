"""The served index version: one reference, swapped atomically on reload.

Requests *lease* the current :class:`indexer.store.IndexVersion` for their whole life; a reload
validates the new version completely (checksums, counts, model fingerprint, dimension,
encoder runtime, self-query) before one reference assignment makes it current. Requests already running finish
on the old version, which is closed when its last lease ends. A version that fails validation
is refused and remembered; the old one keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from indexer.store import (
    DEFAULT_RUNTIME,
    IndexVersion,
    StoreError,
    read_current,
    read_manifest,
    verify_version,
    version_dir,
)
from service.errors import NotReady

if TYPE_CHECKING:
    from model.runtime import RuntimeCheck

logger = logging.getLogger(__name__)


class IndexRejectedError(Exception):
    """A version that may not be served; ``problems`` lists why."""

    def __init__(self, version: str | None, problems: list[str]) -> None:
        subject = f"index version {version} refused" if version else "no index to serve"
        super().__init__(f"{subject}: " + "; ".join(problems))
        self.version = version
        self.problems = problems


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did: ``status`` is 'reloaded' or 'unchanged'."""

    status: str
    version: str
    previous_version: str | None


class _Served:
    """An open version plus the number of requests using it."""

    def __init__(self, index: IndexVersion) -> None:
        self.index = index
        self.leases = 0
        self.retired = False


class IndexHolder:
    """Owns the served version for one index root and one model (fingerprint, dimension) in
    one encoder runtime (``runtime`` and its export-time ``check``, None for torch)."""

    def __init__(
        self,
        root: Path,
        *,
        fingerprint: str,
        dim: int,
        runtime: str = DEFAULT_RUNTIME,
        check: RuntimeCheck | None = None,
        on_swap: Callable[[IndexVersion], None] | None = None,
    ) -> None:
        self.root = root
        self.fingerprint = fingerprint
        self.dim = dim
        self.runtime = runtime
        self.check = check
        self._on_swap = on_swap or (lambda index: None)
        self._served: _Served | None = None
        self._lease_lock = threading.Lock()  # guards lease counts and the reference
        self._reload_lock = threading.Lock()  # one reload at a time
        self._closed = False
        self.problem: str | None = "no index loaded yet"
        self.refused: dict[str, list[str]] = {}

    @property
    def current(self) -> IndexVersion | None:
        served = self._served
        return served.index if served else None

    @property
    def version(self) -> str | None:
        served = self._served
        return served.index.version if served else None

    @contextmanager
    def lease(self) -> Iterator[IndexVersion]:
        """The current version, kept open until the ``with`` block ends; 503 when none."""
        with self._lease_lock:
            served = self._served
            if served is None:
                raise NotReady(f"no index is being served: {self.problem}")
            served.leases += 1
        try:
            yield served.index
        finally:
            with self._lease_lock:
                served.leases -= 1
                close_now = served.retired and served.leases == 0
            if close_now:
                served.index.close()

    def check_compatible(
        self, fingerprint: str, dim: int, runtime: str = DEFAULT_RUNTIME
    ) -> list[str]:
        """Problems that forbid serving an index of this ``fingerprint``, ``dim`` and encoder
        ``runtime`` ([] = none)."""
        from model.runtime import RUNTIMES, compatible

        problems = []
        if dim != self.dim:
            problems.append(
                f"dimension mismatch: the index holds {dim}-d vectors, the model makes "
                f"{self.dim}-d ones"
            )
        if fingerprint != self.fingerprint:
            problems.append(
                f"model fingerprint mismatch: the index was built by model {fingerprint[:12]}…, "
                f"the loaded model is {self.fingerprint[:12]}…"
            )
        if not compatible(runtime, self.runtime, self.check):
            problems.append(
                f"encoder runtime mismatch: the index was built with the {runtime!r} runtime, "
                f"queries are encoded with {self.runtime!r} (VLD_RUNTIME), and the two are not "
                f"checked compatible (known runtimes: {', '.join(RUNTIMES)})"
            )
        return problems

    def _open_validated(self, version: str, *, verify: bool) -> IndexVersion:
        # The manifest first: a version built for another model is refused with that reason,
        # before any checksum is computed.
        try:
            manifest = read_manifest(version_dir(self.root, version))
            problems = self.check_compatible(
                manifest.model.fingerprint, manifest.dim, manifest.runtime
            )
        except StoreError as exc:
            problems = [str(exc)]
        if problems:
            raise IndexRejectedError(version, problems)
        if verify:
            problems = verify_version(
                self.root, version, fingerprint=self.fingerprint, self_query=True
            )
            if problems:
                raise IndexRejectedError(version, problems)
        try:
            index = IndexVersion.open(self.root, version)
        except StoreError as exc:
            raise IndexRejectedError(version, [str(exc)]) from exc
        problems = self.check_compatible(index.fingerprint, index.dim, index.runtime)
        if problems:  # the files changed since the manifest was read
            index.close()
            raise IndexRejectedError(version, problems)
        return index

    def _refuse(self, version: str | None, problems: list[str]) -> IndexRejectedError:
        error = IndexRejectedError(version, problems)
        if version is not None:
            self.refused[version] = problems
        logger.error("%s; still serving %s", error, self.version or "nothing")
        if self._served is None:
            self.problem = str(error)
        return error

    def _swap(self, index: IndexVersion) -> None:
        new = _Served(index)
        with self._lease_lock:
            old, self._served = self._served, new  # the one reference assignment
            close_old = old is not None and old.leases == 0
            if old is not None:
                old.retired = True
        self.problem = None
        self._on_swap(index)
        if close_old and old is not None:
            old.index.close()

    def reload(self, *, verify: bool = True) -> ReloadOutcome:
        """Serve the version ``CURRENT`` names, after validating it. Blocking: run in a thread.

        Raises :class:`IndexRejectedError` (nothing published, unreadable, corrupt, other
        model, other dimension, incompatible runtime); the served version is then left as it was.
        """
        with self._reload_lock:
            if self._closed:
                raise IndexRejectedError(None, ["the service is shutting down"])
            previous = self.version
            try:
                version = read_current(self.root)
                if version is None:
                    raise IndexRejectedError(None, [f"nothing is published under {self.root}"])
            except (StoreError, OSError) as exc:
                raise self._refuse(None, [f"cannot read {self.root}/CURRENT: {exc}"]) from exc
            except IndexRejectedError as exc:
                raise self._refuse(None, exc.problems) from None
            if version == previous:
                return ReloadOutcome("unchanged", version, previous)
            try:
                index = self._open_validated(version, verify=verify)
            except IndexRejectedError as exc:
                raise self._refuse(version, exc.problems) from None
            except Exception as exc:  # a bug or an OS error: refuse, keep serving, keep the trace
                logger.exception("index version %s could not be opened", version)
                raise self._refuse(version, [repr(exc)]) from exc
            self.refused.pop(version, None)
            self._swap(index)
            logger.info(
                "serving index version %s (%d images, %d captions)%s",
                version,
                index.image_count,
                index.caption_count,
                f", replacing {previous}" if previous else "",
            )
            return ReloadOutcome("reloaded", version, previous)

    def close(self) -> None:
        """Close the served version (at shutdown, after requests have drained).

        Waits for a reload in progress, and refuses later ones, so none can swap a version in
        after this. Blocking: run it in a thread.
        """
        with self._reload_lock:
            self._closed = True
        with self._lease_lock:
            served, self._served = self._served, None
        if served is not None:
            served.index.close()
        self.problem = "the service is shutting down"
