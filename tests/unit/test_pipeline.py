"""`KeyedPipeline` and `OffsetCommitter` against a scripted subscriber.

Ordering is controlled with events, never with sleeps: a test decides when each record's handling may end
and when a commit returns, and checks every commit against what was handled at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from broker import BrokerConfigError, BrokerConnectionError, BrokerMessage
from saga.committer import OffsetCommitter
from saga.pipeline import KeyedPipeline

TP = tuple[str, int | None]


def record(key: str, offset: int, partition: int = 0) -> BrokerMessage:
    return BrokerMessage("t", key.encode(), b"", partition=partition, offset=offset)


class ScriptedSubscriber:
    """Hands out fed records (``getmany`` waits for some) and keeps every commit.

    ``check`` runs on each commit before it is recorded, so a test can assert what held at that moment.
    ``hold`` makes commits wait until it is set.
    """

    def __init__(self) -> None:
        self.buffer: list[BrokerMessage] = []
        self.arrived = asyncio.Event()
        self.fetches: list[int] = []  # max_records of each fetch
        self.commits: list[dict[TP, int]] = []
        self.committed: dict[TP, int] = {}
        self.changed = asyncio.Condition()
        self.check: Callable[[dict[TP, int]], None] = lambda offsets: None
        self.hold = asyncio.Event()
        self.hold.set()
        self.failures: list[Exception] = []

    def feed(self, messages: Sequence[BrokerMessage]) -> None:
        self.buffer.extend(messages)
        self.arrived.set()

    async def getmany(self, *, timeout: float = 1.0, max_records: int = 500) -> list[BrokerMessage]:  # noqa: ASYNC109
        self.fetches.append(max_records)
        while not self.buffer:
            self.arrived.clear()
            await self.arrived.wait()
        batch, self.buffer = self.buffer[:max_records], self.buffer[max_records:]
        return batch

    async def commit(self, messages: Sequence[BrokerMessage]) -> None:
        await self.hold.wait()
        if self.failures:
            raise self.failures.pop(0)
        offsets: dict[TP, int] = {}
        for m in messages:
            assert m.offset is not None
            offsets[m.topic, m.partition] = max(offsets.get((m.topic, m.partition), 0), m.offset + 1)
        self.check(offsets)
        self.commits.append(offsets)
        async with self.changed:
            self.committed.update(offsets)
            self.changed.notify_all()

    async def committed_to(self, offset: int, tp: TP = ("t", 0)) -> None:
        async with asyncio.timeout(10), self.changed:
            await self.changed.wait_for(lambda: self.committed.get(tp) == offset)


def pipeline(
    subscriber: ScriptedSubscriber,
    process: Callable[[BrokerMessage], Awaitable[bool]],
    *,
    concurrency: int = 16,
    max_records: int = 100,
    grace: float = 10.0,
    **kw: Any,
) -> KeyedPipeline:
    return KeyedPipeline(
        subscriber,  # type: ignore[arg-type]
        process,
        lane=lambda m: m.key,
        concurrency=concurrency,
        max_records=max_records,
        poll_timeout=0.01,
        on_fetch_error=kw.pop("on_fetch_error", lambda exc, n: 0.0),
        name="test",
        retry_initial=0.001,
        retry_max=0.001,
        grace=grace,
        **kw,
    )


async def until(predicate: Callable[[], bool], turns: int = 10_000) -> None:
    """Let the loop turn until ``predicate`` holds; a condition never reached fails, not hangs."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def wait(awaitable: Awaitable[Any]) -> Any:
    """Await, failing instead of hanging (no assertion depends on this bound)."""
    async with asyncio.timeout(10):
        return await awaitable


async def test_a_slow_key_does_not_hold_up_other_keys_nor_later_fetches() -> None:
    subscriber = ScriptedSubscriber()
    release_a = asyncio.Event()
    b_done = asyncio.Event()
    handled: list[int] = []

    async def process(message: BrokerMessage) -> bool:
        if message.key == b"A":
            await release_a.wait()
        handled.append(message.offset or 0)
        if message.offset == 3:
            b_done.set()
        return True

    subscriber.feed([record("A", 0), record("B", 1)])
    run = pipeline(subscriber, process)
    task = asyncio.create_task(run.run())
    await until(lambda: 1 in handled)
    subscriber.feed([record("B", 2), record("B", 3)])  # a later batch, fetched while A is still going
    await wait(b_done.wait())
    assert handled == [1, 2, 3] and len(subscriber.fetches) >= 2
    assert subscriber.commits == []  # nothing may pass A's record at offset 0
    release_a.set()
    await subscriber.committed_to(4)
    assert handled == [1, 2, 3, 0]
    run.stop()
    await wait(task)


async def test_records_of_one_key_are_handled_in_order_and_keys_concurrently() -> None:
    subscriber = ScriptedSubscriber()
    keys = "ABC"
    records = [record(keys[i % 3], i) for i in range(60)]
    order: dict[bytes | None, list[int]] = defaultdict(list)
    active: set[bytes | None] = set()
    overlaps: list[BrokerMessage] = []
    most_active = 0

    async def process(message: BrokerMessage) -> bool:
        nonlocal most_active
        if message.key in active:
            overlaps.append(message)
        active.add(message.key)
        most_active = max(most_active, len(active))
        # Later records take fewer turns: handled concurrently, they would overtake earlier ones.
        for _ in range(60 - (message.offset or 0)):
            await asyncio.sleep(0)
        active.discard(message.key)
        order[message.key].append(message.offset or 0)
        return True

    subscriber.feed(records)
    run = pipeline(subscriber, process, max_records=7)
    task = asyncio.create_task(run.run())
    await subscriber.committed_to(60)
    run.stop()
    await wait(task)
    assert overlaps == []
    for i, key in enumerate(keys):
        assert order[key.encode()] == list(range(i, 60, 3))
    assert most_active == 3


async def test_a_partition_is_never_committed_past_a_record_not_yet_handled() -> None:
    subscriber = ScriptedSubscriber()
    records = [record("ABCD"[i % 4], i // 2, partition=i % 2) for i in range(40)]
    gates = {(m.partition, m.offset): asyncio.Event() for m in records}
    handled: set[tuple[int | None, int | None]] = set()
    violations: list[tuple[TP, int]] = []

    def check(offsets: dict[TP, int]) -> None:
        for (_, partition), offset in offsets.items():
            if any((partition, o) not in handled for o in range(offset)):
                violations.append(((_, partition), offset))

    subscriber.check = check

    async def process(message: BrokerMessage) -> bool:
        await gates[message.partition, message.offset].wait()
        handled.add((message.partition, message.offset))
        return True

    subscriber.feed(records)
    run = pipeline(subscriber, process)
    task = asyncio.create_task(run.run())
    opening = list(gates.values())
    random.Random(7).shuffle(opening)
    for gate in opening:
        gate.set()
        for _ in range(5):
            await asyncio.sleep(0)
    await subscriber.committed_to(20, ("t", 0))
    await subscriber.committed_to(20, ("t", 1))
    run.stop()
    await wait(task)
    assert violations == []
    assert len(subscriber.commits) > 2  # commits happened along the way, each checked


async def test_a_rewound_partition_is_handled_again_in_order_and_never_committed_past() -> None:
    subscriber = ScriptedSubscriber()
    release = asyncio.Event()
    seen: list[int] = []

    async def process(message: BrokerMessage) -> bool:
        if message.offset == 1 and not release.is_set():
            await release.wait()
        seen.append(message.offset or 0)
        return True

    subscriber.check = lambda offsets: None
    subscriber.feed([record("A", 0), record("A", 1), record("B", 2)])
    run = pipeline(subscriber, process)
    task = asyncio.create_task(run.run())
    await subscriber.committed_to(1)
    subscriber.feed([record("A", 1), record("B", 2)])  # a rebalance rewound the partition to offset 1
    await until(lambda: seen.count(2) == 2)
    assert all(c[("t", 0)] <= 1 for c in subscriber.commits)
    release.set()
    await subscriber.committed_to(3)
    run.stop()
    await wait(task)
    assert seen == [0, 2, 2, 1, 1]


async def test_concurrency_bounds_the_records_in_progress_and_fetching_waits() -> None:
    subscriber = ScriptedSubscriber()
    gates = [asyncio.Event() for _ in range(10)]
    started: list[int] = []

    async def process(message: BrokerMessage) -> bool:
        started.append(message.offset or 0)
        await gates[message.offset or 0].wait()
        return True

    subscriber.feed([record(f"k{i}", i) for i in range(10)])
    run = pipeline(subscriber, process, concurrency=3, max_records=100)
    task = asyncio.create_task(run.run())
    await until(lambda: len(started) == 3)
    fetches = len(subscriber.fetches)
    for _ in range(50):  # the fetch loop, were it not waiting, would fetch again in these turns
        await asyncio.sleep(0)
    assert started == [0, 1, 2] and run.in_progress == 3
    assert len(subscriber.fetches) == fetches and subscriber.fetches[0] == 3
    gates[1].set()
    await until(lambda: len(started) == 4)
    assert run.in_progress == 3 and started == [0, 1, 2, 3]
    for gate in gates:
        gate.set()
    await subscriber.committed_to(10)
    assert max(subscriber.fetches) <= 3
    run.stop()
    await wait(task)


async def test_commits_coalesce_and_stop_commits_what_was_handled() -> None:
    subscriber = ScriptedSubscriber()
    subscriber.hold.clear()  # the first commit stays in flight
    first_started = asyncio.Event()
    original_commit = subscriber.commit
    calls = 0

    async def commit(messages: Sequence[BrokerMessage]) -> None:
        nonlocal calls
        calls += 1
        first_started.set()
        await original_commit(messages)

    subscriber.commit = commit  # type: ignore[method-assign]
    handled: list[int] = []

    async def process(message: BrokerMessage) -> bool:
        handled.append(message.offset or 0)
        return True

    run = pipeline(subscriber, process)
    task = asyncio.create_task(run.run())
    subscriber.feed([record("A", 0)])
    await wait(first_started.wait())  # committing offset 1, held
    subscriber.feed([record(f"k{i}", i) for i in range(1, 5)])
    await until(lambda: len(handled) == 5)
    run.stop()
    subscriber.hold.set()
    await wait(task)
    assert subscriber.commits == [{("t", 0): 1}, {("t", 0): 5}]  # one more commit carried all four
    assert calls == 2


async def test_stop_lets_records_in_progress_finish_then_commits_them() -> None:
    subscriber = ScriptedSubscriber()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def process(message: BrokerMessage) -> bool:
        entered.set()
        await release.wait()
        return True

    subscriber.feed([record("A", 0)])
    run = pipeline(subscriber, process)
    task = asyncio.create_task(run.run())
    await wait(entered.wait())
    run.stop(grace=30)
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done()
    release.set()
    await wait(task)
    assert subscriber.committed == {("t", 0): 1}


async def test_stop_cancels_what_overstays_the_grace_and_commits_only_the_rest() -> None:
    subscriber = ScriptedSubscriber()
    entered = asyncio.Event()
    cancelled = asyncio.Event()
    fast_done = asyncio.Event()

    async def process(message: BrokerMessage) -> bool:
        if message.offset == 2:
            fast_done.set()
        if message.key == b"slow":
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return True

    subscriber.feed([record("fast", 0), record("slow", 1), record("fast", 2)])
    run = pipeline(subscriber, process)
    task = asyncio.create_task(run.run())
    await wait(entered.wait())
    await wait(fast_done.wait())
    await subscriber.committed_to(1)
    run.stop(grace=0)
    await wait(task)
    assert cancelled.is_set()
    assert subscriber.committed == {("t", 0): 1}  # offset 2 was handled, but 1 was not


async def test_an_abandoned_record_holds_its_partition_and_halts_fetching() -> None:
    subscriber = ScriptedSubscriber()

    async def process(message: BrokerMessage) -> bool:
        return message.offset != 1  # 1: "stopping, leave it"

    subscriber.feed([record("A", 0), record("A", 1), record("A", 2), record("B", 3)])
    run = pipeline(subscriber, process, max_records=4)
    task = asyncio.create_task(run.run())
    await subscriber.committed_to(1)
    run.stop()
    await wait(task)
    assert subscriber.committed == {("t", 0): 1}


async def test_a_failing_record_lets_the_others_finish_then_raises() -> None:
    subscriber = ScriptedSubscriber()
    release = asyncio.Event()
    entered = asyncio.Event()

    async def process(message: BrokerMessage) -> bool:
        if message.key == b"bad":
            await entered.wait()
            raise RuntimeError("boom")
        entered.set()
        await release.wait()
        return True

    subscriber.feed([record("good", 0), record("bad", 1)])
    run = pipeline(subscriber, process)
    task = asyncio.create_task(run.run())
    await wait(entered.wait())
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done()  # the good record is still in progress
    release.set()
    with pytest.raises(RuntimeError, match="boom"):
        await wait(task)
    assert subscriber.committed == {("t", 0): 1}


async def test_fetch_errors_back_off_or_fail_as_the_consumer_decides() -> None:
    subscriber = ScriptedSubscriber()
    failures = [BrokerConnectionError("blip"), BrokerConfigError("fatal")]
    original = subscriber.getmany
    told: list[tuple[str, int]] = []

    async def getmany(**kwargs: Any) -> list[BrokerMessage]:
        if failures:
            raise failures.pop(0)
        return await original(**kwargs)

    def on_fetch_error(exc: Exception, count: int) -> float:
        told.append((type(exc).__name__, count))
        if not isinstance(exc, BrokerConnectionError):
            raise exc
        return 0.0

    async def process(message: BrokerMessage) -> bool:
        return True

    subscriber.getmany = getmany  # type: ignore[method-assign]
    run = pipeline(subscriber, process, on_fetch_error=on_fetch_error)
    with pytest.raises(BrokerConfigError):
        await run.run()
    assert told == [("BrokerConnectionError", 1), ("BrokerConfigError", 2)]


async def test_stop_abandons_a_fetch_that_completes_before_the_fetcher_resumes() -> None:
    subscriber = ScriptedSubscriber()
    handled: list[BrokerMessage] = []

    async def process(message: BrokerMessage) -> bool:
        handled.append(message)
        return True

    run = pipeline(subscriber, process)
    task = asyncio.create_task(run.run())
    await until(lambda: len(subscriber.fetches) == 1)
    subscriber.feed([record("A", 0)])  # the fetch has its record, but has not returned it yet
    run.stop()
    await wait(task)
    assert handled == [] and subscriber.committed == {}  # left for redelivery


async def test_a_fetch_that_swallows_the_abandoning_cancellation_is_still_abandoned() -> None:
    subscriber = ScriptedSubscriber()
    entered = asyncio.Event()
    handled: list[BrokerMessage] = []

    async def getmany(**kwargs: Any) -> list[BrokerMessage]:
        entered.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return [record("A", 0)]

    async def process(message: BrokerMessage) -> bool:
        handled.append(message)
        return True

    subscriber.getmany = getmany  # type: ignore[method-assign]
    run = pipeline(subscriber, process)
    task = asyncio.create_task(run.run())
    await wait(entered.wait())
    run.stop()
    await wait(task)
    assert handled == [] and subscriber.committed == {}


async def test_cancelling_run_during_a_fetch_cancels_it_rather_than_halting() -> None:
    subscriber = ScriptedSubscriber()

    async def process(message: BrokerMessage) -> bool:
        return True

    run = pipeline(subscriber, process)
    task = asyncio.create_task(run.run())
    await until(lambda: len(subscriber.fetches) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait(task)


async def test_the_first_record_of_a_new_lane_runs_in_the_task_that_fetched_it() -> None:
    subscriber = ScriptedSubscriber()
    original = subscriber.getmany
    fetched_by: list[asyncio.Task[Any] | None] = []
    handled_by: dict[int, asyncio.Task[Any] | None] = {}

    async def getmany(**kwargs: Any) -> list[BrokerMessage]:
        batch = await original(**kwargs)
        fetched_by.append(asyncio.current_task())
        return batch

    async def process(message: BrokerMessage) -> bool:
        handled_by[message.offset or 0] = asyncio.current_task()
        return True

    subscriber.getmany = getmany  # type: ignore[method-assign]
    subscriber.feed([record("A", 0), record("B", 1), record("A", 2)])
    run = pipeline(subscriber, process)
    task = asyncio.create_task(run.run())
    await subscriber.committed_to(3)
    subscriber.feed([record("C", 3)])  # fetched by the task that took over fetching
    await subscriber.committed_to(4)
    run.stop()
    await wait(task)
    assert handled_by[0] is fetched_by[0] and handled_by[2] is fetched_by[0]  # lane A, in order
    assert handled_by[1] is not fetched_by[0]  # lane B got a task of its own
    assert handled_by[3] is fetched_by[1] and fetched_by[1] is not fetched_by[0]


async def test_committer_retries_retriable_failures_with_the_newest_offsets() -> None:
    subscriber = ScriptedSubscriber()
    subscriber.failures = [BrokerConnectionError("coordinator moving")]
    committer = OffsetCommitter(subscriber, name="test", retry_initial=0.001, retry_max=0.001)  # type: ignore[arg-type]
    subscriber.hold.clear()
    committer.mark(("t", 0), 3)
    for _ in range(5):
        await asyncio.sleep(0)
    committer.mark(("t", 0), 7)  # arrives while the failing commit is in flight
    committer.mark(("t", 1), 2)
    subscriber.hold.set()
    await subscriber.committed_to(7)
    await subscriber.committed_to(2, ("t", 1))
    await committer.close(1.0)
    assert subscriber.commits == [{("t", 0): 7, ("t", 1): 2}]
    assert committer.commits == 1


async def test_committer_close_commits_what_was_marked_while_a_commit_was_in_flight() -> None:
    subscriber = ScriptedSubscriber()
    subscriber.hold.clear()
    committer = OffsetCommitter(subscriber, name="test", retry_initial=0.001, retry_max=0.001)  # type: ignore[arg-type]
    committer.mark(("t", 0), 1)
    for _ in range(5):
        await asyncio.sleep(0)  # the first commit is now waiting in the subscriber
    committer.mark(("t", 0), 5)
    closing = asyncio.create_task(committer.close(1.0))
    await asyncio.sleep(0)  # close() has begun: the committer's own loop commits nothing more
    subscriber.hold.set()
    await wait(closing)
    assert subscriber.commits == [{("t", 0): 1}, {("t", 0): 5}]


async def test_committer_drops_offsets_a_commit_refuses_for_good(caplog: pytest.LogCaptureFixture) -> None:
    subscriber = ScriptedSubscriber()
    subscriber.failures = [BrokerConfigError("bad offsets")]
    committer = OffsetCommitter(subscriber, name="test", retry_initial=0.001, retry_max=0.001)  # type: ignore[arg-type]
    committer.mark(("t", 0), 3)
    await committer.close(1.0)
    assert subscriber.commits == [] and "records may be redelivered" in caplog.text
    committer.mark(("t", 0), 4)  # after close: nothing starts again
    await asyncio.sleep(0)
    assert subscriber.commits == []


def test_concurrency_must_be_positive() -> None:
    async def process(message: BrokerMessage) -> bool:
        return True

    with pytest.raises(ValueError, match="concurrency"):
        pipeline(ScriptedSubscriber(), process, concurrency=0)


async def test_committer_spaces_commits_by_its_interval_and_close_does_not_wait_for_it() -> None:
    subscriber = ScriptedSubscriber()
    committer = OffsetCommitter(
        subscriber,  # type: ignore[arg-type]
        name="test",
        retry_initial=0.001,
        retry_max=0.001,
        interval=3600.0,
    )
    committer.mark(("t", 0), 1)
    await subscriber.committed_to(1)
    for offset in (2, 3, 4):  # within the interval: remembered, not committed
        committer.mark(("t", 0), offset)
        for _ in range(5):
            await asyncio.sleep(0)
    assert subscriber.commits == [{("t", 0): 1}]
    await wait(asyncio.create_task(committer.close(1.0)))
    assert subscriber.commits == [{("t", 0): 1}, {("t", 0): 4}]


def test_committer_refuses_a_negative_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        OffsetCommitter(None, name="t", retry_initial=0.1, retry_max=0.1, interval=-1)  # type: ignore[arg-type]
