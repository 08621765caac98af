"""MicroBatcher: gathering, the window, the bounded queue, failures and cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

import pytest

from service.batching import BatchingConfig, MicroBatcher
from service.errors import NotReady, Overloaded


class Recorder:
    """A batch processor that records batches and which thread ran them."""

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail_on = fail_on

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"cannot process {self.fail_on}")
        return [item * 10 for item in items]


def config(**overrides: float) -> BatchingConfig:
    values = {
        "max_batch_size": 8, "window_s": 0.05, "capacity": 100, "retry_after_s": 2,
        "max_wait_s": 0.5,
    }  # fmt: skip
    values.update(overrides)
    return BatchingConfig(**values)  # type: ignore[arg-type]


def run(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_items_share_one_batch_in_the_worker_thread() -> None:
    recorder = Recorder()

    async def scenario() -> list[int]:
        batcher = MicroBatcher("t", recorder, config())
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        finally:
            await batcher.stop()

    assert run(scenario()) == [0, 10, 20, 30, 40]
    assert recorder.batches == [[0, 1, 2, 3, 4]]
    assert recorder.threads and all(name.startswith("batch-t") for name in recorder.threads)


def test_batches_are_capped_at_max_batch_size() -> None:
    recorder = Recorder()

    async def scenario() -> list[int]:
        batcher = MicroBatcher("t", recorder, config(max_batch_size=3))
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(7)))
        finally:
            await batcher.stop()

    assert run(scenario()) == [i * 10 for i in range(7)]
    assert [len(b) for b in recorder.batches] == [3, 3, 1]


def test_a_trickling_burst_stays_one_batch_until_a_quiet_gap() -> None:
    """Items 20 ms apart with a 150 ms quiet window form one batch even though the burst
    (200 ms) lasts longer than the window; a fixed window would have split it. The gaps are
    7x under the window so a loaded machine's late wake-ups do not split the burst."""
    recorder = Recorder()

    async def scenario() -> None:
        batcher = MicroBatcher(
            "t", recorder, config(window_s=0.15, max_wait_s=5.0, max_batch_size=16)
        )
        await batcher.start()
        try:
            tasks = []
            for i in range(10):
                tasks.append(asyncio.create_task(batcher.submit(i)))
                await asyncio.sleep(0.02)
            await asyncio.gather(*tasks)
            await asyncio.sleep(0.5)  # quiet: the next item starts a new batch
            await batcher.submit(99)
        finally:
            await batcher.stop()

    run(scenario())
    assert recorder.batches == [list(range(10)), [99]]


def test_max_wait_caps_how_long_a_batch_keeps_gathering() -> None:
    recorder = Recorder()

    async def scenario() -> None:
        batcher = MicroBatcher("t", recorder, config(window_s=0.03, max_wait_s=0.05))
        await batcher.start()
        try:
            tasks = []
            for i in range(10):  # 10 ms apart for ~100 ms: never quiet, but capped at 50 ms
                tasks.append(asyncio.create_task(batcher.submit(i)))
                await asyncio.sleep(0.01)
            await asyncio.gather(*tasks)
        finally:
            await batcher.stop()

    run(scenario())
    assert len(recorder.batches) >= 2
    assert [item for batch in recorder.batches for item in batch] == list(range(10))
    assert len(recorder.batches[0]) <= 7


def test_closed_loop_clients_merge_into_full_batches() -> None:
    """Two groups of clients (one queued while the other's batch runs) must not alternate
    half batches forever: queued queries wait for the clients just answered."""
    recorder = Recorder(delay_s=0.05)

    async def scenario() -> None:
        batcher = MicroBatcher("t", recorder, config(window_s=0.01, max_wait_s=0.2))
        await batcher.start()

        async def client(i: int, start_after: float) -> None:
            await asyncio.sleep(start_after)
            for _ in range(6):
                await batcher.submit(i)
                await asyncio.sleep(0.002 * (i % 4))  # answers go out one after another

        try:
            await asyncio.gather(*(client(i, 0.0 if i < 4 else 0.02) for i in range(8)))
        finally:
            await batcher.stop()

    run(scenario())
    sizes = [len(batch) for batch in recorder.batches]
    assert sizes[0] == 4  # the second group arrived while the first batch ran
    assert sizes[1:4] == [8, 8, 8], sizes  # then the groups merged


def test_window_zero_processes_each_item_alone() -> None:
    recorder = Recorder()

    async def scenario() -> None:
        batcher = MicroBatcher("t", recorder, config(window_s=0.0, max_batch_size=1))
        await batcher.start()
        try:
            await asyncio.gather(*(batcher.submit(i) for i in range(4)))
        finally:
            await batcher.stop()

    run(scenario())
    assert recorder.batches == [[0], [1], [2], [3]]


def test_a_lone_item_waits_at_most_about_the_window() -> None:
    recorder = Recorder()

    async def scenario() -> float:
        batcher = MicroBatcher("t", recorder, config(window_s=0.05))
        await batcher.start()
        try:
            started = time.perf_counter()
            await batcher.submit(1)
            return time.perf_counter() - started
        finally:
            await batcher.stop()

    elapsed = run(scenario())
    assert 0.04 <= elapsed < 1.0, elapsed


def test_a_full_queue_rejects_at_once_and_counts_running_items() -> None:
    recorder = Recorder(delay_s=0.3)
    depths: list[int] = []
    rejected = 0

    def on_reject() -> None:
        nonlocal rejected
        rejected += 1

    async def scenario() -> list[object]:
        batcher = MicroBatcher(
            "t",
            recorder,
            config(capacity=3, window_s=0.0, max_batch_size=1),
            on_depth=depths.append,
            on_reject=on_reject,
        )
        await batcher.start()
        try:
            started = time.perf_counter()
            tasks = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
            done, _ = await asyncio.wait(tasks, timeout=0.1)
            quick = time.perf_counter() - started
            assert quick < 0.3
            assert len(done) == 2 and all(isinstance(t.exception(), Overloaded) for t in done)
            assert batcher.depth == 3
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await batcher.stop()

    outcomes = run(scenario())
    assert outcomes[:3] == [0, 10, 20]
    assert all(isinstance(o, Overloaded) for o in outcomes[3:])
    assert outcomes[3].headers == {"Retry-After": "2"}  # type: ignore[union-attr]
    assert rejected == 2
    assert max(depths) == 3 and depths[-1] == 0


def test_a_poisoned_batch_answers_every_good_item_and_fails_only_the_bad_one() -> None:
    """One bad item among 7 good: the batch fails, each item is retried alone, 7 answers."""
    recorder = Recorder(fail_on=5)

    async def scenario() -> tuple[list[object], int]:
        batcher = MicroBatcher("t", recorder, config(window_s=0.05))
        await batcher.start()
        try:
            first = await asyncio.gather(
                *(batcher.submit(i) for i in range(8)), return_exceptions=True
            )
            return first, await batcher.submit(7)
        finally:
            await batcher.stop()

    first, later = run(scenario())
    assert first[:5] + first[6:] == [0, 10, 20, 30, 40, 60, 70]
    assert isinstance(first[5], RuntimeError) and "cannot process 5" in str(first[5])
    assert recorder.batches[0] == list(range(8))  # one real batch, poisoned...
    assert recorder.batches[1:9] == [[i] for i in range(8)]  # ...then each item alone
    assert later == 70  # and the batcher keeps going


def test_a_batch_returning_the_wrong_count_is_retried_item_by_item() -> None:
    def short_by_one(items: Sequence[int]) -> list[int]:
        return [item * 10 for item in items][: max(1, len(items) - 1)]

    async def scenario() -> list[int]:
        batcher = MicroBatcher("t", short_by_one, config())
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(4)))
        finally:
            await batcher.stop()

    assert run(scenario()) == [0, 10, 20, 30]


def test_cancelled_items_are_skipped() -> None:
    recorder = Recorder(delay_s=0.2)

    async def scenario() -> None:
        batcher = MicroBatcher("t", recorder, config(window_s=0.0, max_batch_size=1))
        await batcher.start()
        try:
            busy = asyncio.create_task(batcher.submit(1))
            await asyncio.sleep(0.05)  # item 1 is running
            abandoned = asyncio.create_task(batcher.submit(2))
            await asyncio.sleep(0.01)
            abandoned.cancel()
            assert await busy == 10
            assert await batcher.submit(3) == 30
            assert batcher.depth == 0
        finally:
            await batcher.stop()

    run(scenario())
    assert [1] in recorder.batches and [3] in recorder.batches
    assert [2] not in recorder.batches


def test_submit_before_start_and_after_stop_is_not_ready() -> None:
    async def scenario() -> None:
        batcher = MicroBatcher("t", Recorder(), config())
        with pytest.raises(NotReady):
            await batcher.submit(1)
        await batcher.start()
        assert await batcher.submit(1) == 10
        await batcher.stop()
        with pytest.raises(NotReady):
            await asyncio.wait_for(batcher.submit(2), timeout=2)

    run(scenario())


def test_stop_while_gathering_fails_the_gathered_items() -> None:
    """Items already taken off the queue by a batch still gathering (long window) get the
    shutting-down error at stop, and leave the depth at 0; none hangs."""
    recorder = Recorder()
    depths: list[int] = []

    async def scenario() -> list[object]:
        batcher = MicroBatcher(
            "t", recorder, config(window_s=5.0, max_wait_s=10.0), on_depth=depths.append
        )
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
        await asyncio.sleep(0.05)  # all three gathered, the batch waits for a quiet gap
        assert batcher.depth == 3
        await batcher.stop()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)

    outcomes = run(scenario())
    assert all(isinstance(o, NotReady) for o in outcomes), outcomes
    assert recorder.batches == [] and depths[-1] == 0


def test_a_prepared_submit_takes_its_place_before_preparing() -> None:
    recorder = Recorder(delay_s=0.3)
    prepared: list[int] = []

    async def scenario() -> list[object]:
        batcher = MicroBatcher("t", recorder, config(capacity=2, window_s=0.0, max_batch_size=1))
        await batcher.start()

        def preparing(i: int) -> Callable[[], Awaitable[int]]:
            async def prepare() -> int:
                prepared.append(i)
                await asyncio.sleep(0.01)
                if i == 1:
                    raise ValueError("cannot prepare 1")
                return i

            return prepare

        try:
            outcomes = await asyncio.gather(
                *(batcher.submit_prepared(preparing(i)) for i in range(4)), return_exceptions=True
            )
            assert batcher.depth == 0  # the failed preparation gave its place back
            return [*outcomes, await batcher.submit_prepared(preparing(5))]
        finally:
            await batcher.stop()

    outcomes = run(scenario())
    assert outcomes[0] == 0 and isinstance(outcomes[1], ValueError)
    assert all(isinstance(o, Overloaded) for o in outcomes[2:4])
    assert outcomes[4] == 50
    assert prepared == [0, 1, 5]  # the refused ones were never prepared


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid batching config"):
        BatchingConfig(max_batch_size=0, window_s=0.0, capacity=1, retry_after_s=1)
    with pytest.raises(ValueError, match="invalid batching config"):
        BatchingConfig(max_batch_size=4, window_s=0.1, capacity=1, retry_after_s=1, max_wait_s=0.05)
