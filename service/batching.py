"""Micro-batching with a bounded queue: many concurrent queries, one forward pass.

Each modality has one :class:`MicroBatcher`. A batch is sent when it is full
(``max_batch_size``), when no new query has arrived for ``window_s`` (the burst is over), or
``max_wait_s`` after the encoder became free to take it. Waiting for a quiet gap rather than a
fixed time matters under load: the event loop parses a burst of requests one by one, a few
ms apart, and a fixed window would cut that burst into small batches. A lone query waits
``window_s``. The batch runs in the batcher's own worker thread (so the event loop stays free
and batches of one modality never overlap). Admission is bounded: at most ``capacity`` queries
may be being prepared (:meth:`MicroBatcher.submit_prepared`), waiting or running; the next one
gets :class:`service.errors.Overloaded` (HTTP 503 + Retry-After) at once.

One bad item never fails its neighbours: when a batch raises, each of its items is processed
again alone, so every query gets its own answer or its own error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from service.errors import NotReady, Overloaded

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int  # queries per forward pass
    window_s: float  # quiet gap that ends a batch; 0 = no batching (batches of one)
    capacity: int  # queries admitted at once (waiting + running)
    retry_after_s: int  # sent with the 503 when full
    max_wait_s: float = 0.05  # the longest the oldest query of a batch waits for more

    def __post_init__(self) -> None:
        if (
            self.max_batch_size < 1
            or self.capacity < 1
            or self.window_s < 0
            or self.max_wait_s < self.window_s
        ):
            raise ValueError(f"invalid batching config {self}")


@dataclass
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    future: asyncio.Future[ResultT]
    enqueued_at: float  # event-loop time


class MicroBatcher(Generic[ItemT, ResultT]):
    """Gather items into batches for ``process`` (blocking, list in → same-length list out)."""

    def __init__(
        self,
        name: str,
        process: Callable[[Sequence[ItemT]], Sequence[ResultT]],
        config: BatchingConfig,
        *,
        on_depth: Callable[[int], None] | None = None,
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._process = process
        self._on_depth = on_depth or (lambda depth: None)
        self._on_reject = on_reject or (lambda: None)
        self._queue: asyncio.Queue[_Pending[ItemT, ResultT]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._admitted = 0
        self._free_at = 0.0  # event-loop time the last batch finished

    @property
    def depth(self) -> int:
        """Queries admitted and not finished (waiting + running)."""
        return self._admitted

    async def start(self) -> None:
        """Start the gathering task (call from the event loop that will submit)."""
        if self._worker is not None:
            return
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{self.name}")
        self._worker = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop gathering; queries still waiting fail with 503 (shutting down)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        queue, self._queue = self._queue, None  # later submits get NotReady, not a dead queue
        if queue is not None:
            waiting = [queue.get_nowait() for _ in range(queue.qsize())]
            self._fail(waiting, NotReady("the service is shutting down"))
            self._admit(-len(waiting))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, item: ItemT) -> ResultT:
        """Queue ``item`` and wait for its result; :class:`Overloaded` at once when full."""
        self._reserve()
        return await self._enqueue(item)

    async def submit_prepared(self, prepare: Callable[[], Awaitable[ItemT]]) -> ResultT:
        """Take a place in the queue, then ``await prepare()`` for the item and queue it.

        For items that are costly to make (a decoded upload): a full queue refuses at once,
        before ``prepare`` runs, and items being prepared count toward ``capacity``.
        """
        self._reserve()
        try:
            item = await prepare()
        except BaseException:
            self._admit(-1)
            raise
        return await self._enqueue(item)

    def _reserve(self) -> None:
        if self._queue is None:
            raise NotReady(f"the {self.name} encoder is not running")
        if self._admitted >= self.config.capacity:
            self._on_reject()
            raise Overloaded(
                f"the {self.name} queue is full ({self.config.capacity} queries); retry later",
                retry_after_s=self.config.retry_after_s,
            )
        self._admit(+1)

    async def _enqueue(self, item: ItemT) -> ResultT:
        """Queue an item whose place :meth:`_reserve` took; the worker gives the place back."""
        if self._queue is None:  # stopped while the item was being prepared
            self._admit(-1)
            raise NotReady("the service is shutting down")
        loop = asyncio.get_running_loop()
        pending = _Pending(item, loop.create_future(), loop.time())
        self._queue.put_nowait(pending)
        return await pending.future

    def _admit(self, delta: int) -> None:
        self._admitted += delta
        self._on_depth(self._admitted)

    def _fail(self, batch: Sequence[_Pending[ItemT, ResultT]], error: BaseException) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)

    async def _gather(self) -> list[_Pending[ItemT, ResultT]]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        first = await self._queue.get()
        batch = [first]
        if self.config.window_s <= 0:
            return batch
        # Gathering starts when the encoder is free: queries that queued while the last
        # batch ran wait for the clients that batch just answered, so two groups of clients
        # merge into full batches instead of alternating half batches.
        started = max(first.enqueued_at, self._free_at)
        give_up = started + self.config.max_wait_s
        newest = started
        try:
            while len(batch) < self.config.max_batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    newest = max(newest, batch[-1].enqueued_at)
                    continue
                # Quiet for window_s since the newest arrival (or the cap reached): send.
                remaining = min(newest + self.config.window_s, give_up) - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
                newest = max(newest, batch[-1].enqueued_at)
        except asyncio.CancelledError:  # stop(): the popped queries must not hang
            self._fail(batch, NotReady("the service is shutting down"))
            self._admit(-len(batch))
            raise
        return batch

    def _process_isolated(self, items: list[ItemT]) -> list[ResultT | Exception]:
        """Process ``items`` as one batch; if that raises, each item alone (worker thread).

        Returns one result or exception per item, in order: an item its processing cannot
        handle fails its own query only, and its neighbours are answered.
        """
        try:
            results: list[ResultT | Exception] = list(self._process(items))
            if len(results) != len(items):
                raise RuntimeError(
                    f"{self.name} batch returned {len(results)} results for {len(items)} items"
                )
            return results
        except Exception as exc:
            if len(items) == 1:
                logger.warning("%s query failed: %r", self.name, exc, exc_info=exc)
                return [exc]
            logger.warning(
                "%s batch of %d failed (%r); processing each query alone",
                self.name,
                len(items),
                exc,
            )
        return [self._process_isolated([item])[0] for item in items]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            live = [pending for pending in batch if not pending.future.done()]  # drop cancelled
            try:
                if live:
                    outcomes = await loop.run_in_executor(
                        self._executor, self._process_isolated, [pending.item for pending in live]
                    )
                    for pending, outcome in zip(live, outcomes, strict=True):
                        if pending.future.done():
                            continue
                        if isinstance(outcome, Exception):
                            pending.future.set_exception(outcome)
                        else:
                            pending.future.set_result(outcome)
            except asyncio.CancelledError:
                self._fail(live, NotReady("the service is shutting down"))
                raise
            except Exception as exc:  # a bug in the loop above; the items must not hang
                logger.exception("%s batch of %d failed", self.name, len(live))
                self._fail(live, exc)
            finally:
                self._free_at = loop.time()
                self._admit(-len(batch))
