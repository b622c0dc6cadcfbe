"""Timeouts, retries and deadlines, driven by the recovery worker from storage (in memory, no network).

What the issue promises, one test per rule:

* a paused remote step whose reply is overdue is replayed under the same request id and idempotency key up
  to its retry policy, then compensated (the silent step included: it may have run);
* a reply that arrives late, to the original send or to a replay, is applied once; any copy after that is a
  duplicate, and a reply to an abandoned request is stale: neither changes anything;
* a saga-level ``deadline`` compensates whatever is left, also while a local step is still retrying, and
  never cuts a compensation short;
* local steps retry with backoff before compensating; compensations follow their own retry policy and end
  in ``DEAD_LETTER`` when it runs out (the original error kept as ``cause``);
* all of it is decided from what storage holds, so a manager that "restarts" (a new `SagaManager` on the
  same storage, with nothing in memory) carries on where the previous one stopped, attempts included.

Time is a hand-moved clock shared by the storage and the managers, except in the tests that measure real
backoff delays or run the worker's background loop.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest

from broker import InMemoryBrokerPool
from saga import (
    RetryPolicy,
    Saga,
    SagaBusyError,
    SagaContext,
    SagaManager,
    SagaRecoveryWorker,
    SagaRequest,
    SagaResponse,
    SagaStatus,
)
from saga.messages import SagaCommand
from saga.relay import publish_outbox
from storage import MemorySagaStorage
from tests.unit.conftest import FakeClock

calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def storage(clock: FakeClock) -> MemorySagaStorage:
    return MemorySagaStorage(clock=clock)


@pytest.fixture
def pool() -> InMemoryBrokerPool:
    return InMemoryBrokerPool()


def new_manager(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: Any = None, owner: str = "m"
) -> SagaManager:
    """A manager that neither consumes replies nor relays in the background: the test drives both."""
    return SagaManager(
        storage,
        pool,
        service_name="orch",
        owner=owner,
        clock=clock,
        consume_replies=False,
        relay_outbox=False,
        lease_seconds=30,
    )


@pytest.fixture
async def manager(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock
) -> AsyncIterator[SagaManager]:
    m = new_manager(storage, pool, clock)
    await m.setup()
    try:
        yield m
    finally:
        await m.destroy()


def local(name: str, *, fail: Callable[[], bool] | None = None) -> Callable[[SagaContext], None]:
    """A local step (or compensation) that counts its calls and raises while ``fail()`` says so."""

    def step(context: SagaContext) -> None:
        calls[name] += 1
        if fail is not None and fail():
            raise RuntimeError(f"{name} failed")

    step.__name__ = name
    return step


def command(topic: str) -> Callable[[SagaContext], SagaRequest]:
    def build(context: SagaContext) -> SagaRequest:
        return SagaRequest(topic, {"n": context.get("n", 0)})

    build.__name__ = f"send_{topic}"
    return build


def sent(pool: InMemoryBrokerPool, topic: str) -> list[SagaCommand]:
    return [SagaCommand.from_message(m) for m in pool.topic_messages(topic)]


def reply_to(cmd: SagaCommand, status: int = 200, content: Any = None) -> SagaResponse:
    return SagaResponse(content, status, cmd.execution_id, cmd.request_id, "svc")


# -- step timeouts -----------------------------------------------------------------------------------


async def test_overdue_step_is_replayed_and_a_late_reply_is_applied_once(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock, manager: SagaManager
) -> None:
    saga = (
        Saga("late_reply")
        .local_step(local("reserve"))
        .remote_step(command("charge"), name="charge", timeout=10, retry=RetryPolicy(max_attempts=3))
        .local_step(local("ship"))
        .commit()
    )
    execution = await manager.run(saga, {"n": 1}, pause_on_disk=True)
    record = await storage.load(execution.id)
    assert record.status is SagaStatus.PAUSED
    assert record.reply_deadline == clock.now + timedelta(seconds=10)  # in storage, for the recovery query
    worker = SagaRecoveryWorker(manager)

    clock.advance(9)
    assert (await worker.run_once()).claimed == 0, "not overdue yet: recovery must leave it alone"
    clock.advance(2)
    assert (await worker.run_once()).recovered == [execution.id]

    first, replay = sent(pool, "charge")
    assert (first.request_id, first.idempotency_key) == (replay.request_id, replay.idempotency_key)
    record = await storage.load(execution.id)
    assert record.status is SagaStatus.PAUSED and record.steps[-1].attempts == 2

    # The participant answers both deliveries (it deduplicates by key, so both replies carry the same
    # outcome): the first reply is applied, the second is a duplicate and changes nothing.
    assert await manager.handle_reply(reply_to(first)) == "applied"
    assert await manager.handle_reply(reply_to(replay)) == "duplicate"
    record = await storage.load(execution.id)
    assert record.status is SagaStatus.FINISHED
    assert calls == Counter({"reserve": 1, "ship": 1})
    outcomes = [r.outcome for r in await storage.list_replies(execution.id)]
    assert outcomes.count("applied") == 1 and outcomes.count("duplicate") == 1

    # Nothing is left for recovery, however much time passes.
    clock.advance(3600)
    assert (await worker.run_once()).claimed == 0


async def test_exhausted_replays_compensate_the_silent_step_too(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock, manager: SagaManager
) -> None:
    saga = (
        Saga("silent")
        .local_step(local("reserve"))
        .on_failure(local("unreserve"))
        .remote_step(command("charge"), name="charge", timeout=5, retry=RetryPolicy(max_attempts=3))
        .on_failure(command("refund"))
        .local_step(local("ship"))
        .commit()
    )
    execution = await manager.run(saga, {"n": 2}, pause_on_disk=True)
    worker = SagaRecoveryWorker(manager)
    for attempt in (2, 3):
        clock.advance(6)
        assert (await worker.run_once()).recovered == [execution.id]
        assert len(sent(pool, "charge")) == attempt
    assert len({c.idempotency_key for c in sent(pool, "charge")}) == 1

    # Third timeout: no attempt left. The charge may have happened (only its reply is missing), so its
    # compensation (a refund command) is sent first, then the local step before it is undone.
    clock.advance(6)
    assert (await worker.run_once()).recovered == [execution.id]
    record = await storage.load(execution.id)
    assert record.status is SagaStatus.PAUSED  # waiting for the refund's reply
    assert record.error is not None and record.error["type"] == "timeout"
    (refund,) = sent(pool, "refund")
    assert refund.idempotency_key != sent(pool, "charge")[0].idempotency_key
    assert calls["unreserve"] == 0

    # A reply to the abandoned charge arrives now: stale, ignored.
    assert await manager.handle_reply(reply_to(sent(pool, "charge")[0])) == "stale"
    assert await manager.handle_reply(reply_to(refund)) == "applied"
    record = await storage.load(execution.id)
    assert record.status is SagaStatus.ERRORED
    assert record.error is not None and record.error["type"] == "timeout"
    assert record.error["step"] == "charge"
    assert calls == Counter({"reserve": 1, "unreserve": 1})
    assert len(sent(pool, "charge")) == 3  # never a fourth send


async def test_a_500_reply_is_answered_by_a_new_request_within_the_same_policy(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock, manager: SagaManager
) -> None:
    saga = (
        Saga("flaky")
        .remote_step(command("charge"), name="charge", timeout=5, retry=RetryPolicy(max_attempts=3))
        .commit()
    )
    execution = await manager.run(saga, pause_on_disk=True)
    clock.advance(6)
    await SagaRecoveryWorker(manager).run_once()  # attempt 2: a replay (same request)
    first, replay = sent(pool, "charge")
    assert first.request_id == replay.request_id
    assert await manager.handle_reply(reply_to(first, 500, {"error": "gateway"})) == "applied"
    assert len(sent(pool, "charge")) == 2  # the new request waits out the policy's delay (0.2 s)
    clock.advance(1)
    await publish_outbox(storage, pool, owner=None)
    third = sent(pool, "charge")[2]  # attempt 3: a new request, with a new idempotency key
    assert third.request_id != first.request_id and third.idempotency_key != first.idempotency_key
    # The replay's reply (same request as the 500) is a duplicate now; an answer to the new one finishes it.
    assert await manager.handle_reply(reply_to(replay, 500)) == "duplicate"
    assert await manager.handle_reply(reply_to(third)) == "applied"
    record = await storage.load(execution.id)
    assert record.status is SagaStatus.FINISHED and record.steps[-1].attempts == 3


async def test_remote_compensation_is_replayed_then_dead_lettered(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock, manager: SagaManager
) -> None:
    saga = (
        Saga("stuck_refund")
        .remote_step(
            command("charge"), name="charge", timeout=5, compensation_retry=RetryPolicy(max_attempts=2)
        )
        .on_failure(command("refund"))
        .local_step(local("ship", fail=lambda: True))
        .commit()
    )
    execution = await manager.run(saga, pause_on_disk=True)
    (charge,) = sent(pool, "charge")
    assert await manager.handle_reply(reply_to(charge)) == "applied"  # ship fails -> refund is sent
    worker = SagaRecoveryWorker(manager)
    clock.advance(6)
    assert (await worker.run_once()).recovered == [execution.id]
    first, replay = sent(pool, "refund")
    assert (first.request_id, first.idempotency_key) == (replay.request_id, replay.idempotency_key)
    clock.advance(6)
    assert (await worker.run_once()).recovered == [execution.id]
    record = await storage.load(execution.id)
    assert record.status is SagaStatus.DEAD_LETTER
    assert record.error is not None
    assert record.error["cause"]["step"] == "ship" and "no reply" in record.error["compensation_error"]
    assert len(sent(pool, "refund")) == 2
    clock.advance(3600)
    assert (await worker.run_once()).claimed == 0, "DEAD_LETTER waits for a person"


# -- saga deadline -----------------------------------------------------------------------------------


async def test_saga_deadline_compensates_what_is_left_but_not_a_compensation_in_progress(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock, manager: SagaManager
) -> None:
    saga = (
        Saga("deadline", deadline=60)
        .remote_step(command("reserve"), name="reserve", timeout=1000)
        .on_failure(command("release"))
        .remote_step(command("charge"), name="charge")  # no step timeout: only the deadline applies
        .on_failure(command("refund"))
        .commit()
    )
    started = clock.now
    execution = await manager.run(saga, pause_on_disk=True)
    assert (await storage.load(execution.id)).reply_deadline == started + timedelta(seconds=60)
    assert await manager.handle_reply(reply_to(sent(pool, "reserve")[0])) == "applied"
    # The charge has no step timeout: the saga deadline is what recovery watches for.
    assert (await storage.load(execution.id)).reply_deadline == started + timedelta(seconds=60)
    worker = SagaRecoveryWorker(manager)
    clock.advance(59)
    assert (await worker.run_once()).claimed == 0
    clock.advance(2)
    assert (await worker.run_once()).recovered == [execution.id]
    (refund,) = sent(pool, "refund")  # the silent charge first (it may have run) ...
    assert sent(pool, "release") == []

    # ... and the compensation waits for its reply, deadline or not: compensations are never abandoned
    # because the saga ran out of time (there is no step timeout on charge, so none on its refund).
    clock.advance(3600)
    assert (await worker.run_once()).claimed == 0
    assert await manager.handle_reply(reply_to(refund)) == "applied"
    (release,) = sent(pool, "release")
    assert await manager.handle_reply(reply_to(release)) == "applied"
    record = await storage.load(execution.id)
    assert record.status is SagaStatus.ERRORED
    assert record.error is not None and record.error["type"] == "deadline"


async def test_saga_deadline_stops_a_local_step_that_keeps_retrying(pool: InMemoryBrokerPool) -> None:
    storage = MemorySagaStorage()  # real time: the retry backoff really sleeps
    manager = new_manager(storage, pool)
    saga = (
        Saga("deadline_retry", deadline=0.3)
        .local_step(local("reserve"))
        .on_failure(local("unreserve"))
        .local_step(
            local("charge", fail=lambda: True),
            retry=RetryPolicy(max_attempts=1000, initial_delay=0.02, backoff=1.0),
        )
        .commit()
    )
    await manager.setup()
    try:
        began = time.monotonic()
        execution = await manager.run(saga, raise_on_error=False)
        elapsed = time.monotonic() - began
    finally:
        await manager.destroy()
    assert execution.status is SagaStatus.ERRORED
    assert execution.error is not None and execution.error["type"] == "deadline"
    assert 0.3 <= elapsed < 2.0
    assert 3 <= calls["charge"] < 1000 and calls["unreserve"] == 1


# -- local retries with backoff -----------------------------------------------------------------------


async def test_local_step_retries_with_backoff_then_succeeds(pool: InMemoryBrokerPool) -> None:
    storage = MemorySagaStorage()
    manager = new_manager(storage, pool)
    attempts: list[float] = []

    def flaky(context: SagaContext) -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 4:
            raise ConnectionError("ledger busy")

    policy = RetryPolicy(max_attempts=5, initial_delay=0.05, backoff=2.0, max_delay=0.15)
    saga = Saga("backoff").local_step(flaky, retry=policy).commit()
    await manager.setup()
    try:
        execution = await manager.run(saga)
    finally:
        await manager.destroy()
    assert execution.status is SagaStatus.FINISHED
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    expected = [policy.delay(n) for n in (1, 2, 3)]
    assert expected == [0.05, 0.1, 0.15]  # doubled, then capped by max_delay
    assert all(gap >= want * 0.95 for gap, want in zip(gaps, expected, strict=True)), gaps
    assert (await storage.load(execution.id)).steps[-1].attempts == 4


async def test_local_step_out_of_retries_compensates_only_what_ran(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, manager: SagaManager
) -> None:
    saga = (
        Saga("exhausted")
        .local_step(local("reserve"))
        .on_failure(local("unreserve"))
        .local_step(local("charge", fail=lambda: True), retry=RetryPolicy(max_attempts=3, initial_delay=0))
        .on_failure(local("refund"))
        .commit()
    )
    execution = await manager.run(saga, raise_on_error=False)
    assert execution.status is SagaStatus.ERRORED
    assert calls == Counter({"reserve": 1, "charge": 3, "unreserve": 1})  # no refund: charge never ran
    steps = (await storage.load(execution.id)).steps
    assert [(s.name, s.phase, s.status, s.attempts) for s in steps] == [
        ("reserve", "execute", "succeeded", 1),
        ("charge", "execute", "failed", 3),
        ("reserve", "compensate", "succeeded", 1),
    ]


async def test_local_compensation_retries_then_dead_letters_keeping_the_cause(
    pool: InMemoryBrokerPool, manager: SagaManager
) -> None:
    broken = {"times": 2}

    def sometimes() -> bool:
        broken["times"] -= 1
        return broken["times"] >= 0

    def build(name: str, fail: Callable[[], bool]) -> Saga:
        return (
            Saga(name, compensation_retry=RetryPolicy(max_attempts=3, initial_delay=0))
            .local_step(local("reserve"))
            .on_failure(local("unreserve", fail=fail))
            .local_step(local("charge", fail=lambda: True))
            .commit()
        )

    recovered = await manager.run(build("comp_ok", sometimes), raise_on_error=False)
    assert recovered.status is SagaStatus.ERRORED and calls["unreserve"] == 3
    calls.clear()
    dead = await manager.run(build("comp_dead", lambda: True), raise_on_error=False)
    assert dead.status is SagaStatus.DEAD_LETTER and calls["unreserve"] == 3
    assert dead.error is not None
    assert dead.error["failed_step"] == "charge" and dead.error["cause"]["step"] == "charge"
    assert "unreserve failed" in dead.error["compensation_error"]


# -- from storage: restarts --------------------------------------------------------------------------


async def test_timeouts_and_attempts_survive_manager_restarts(
    storage: MemorySagaStorage, clock: FakeClock
) -> None:
    pools: list[InMemoryBrokerPool] = []

    def process(owner: str) -> SagaManager:
        pools.append(InMemoryBrokerPool())  # a new process: its own connections, nothing in memory
        manager = new_manager(storage, pools[-1], clock, owner=owner)
        manager.register(definition())
        return manager

    def charges() -> int:
        return sum(len(sent(pool, "charge")) for pool in pools)

    def definition() -> Saga:
        # Each "process" builds its own definition object, as a restarted service would.
        return (
            Saga("restart", version=3)
            .local_step(local("reserve"))
            .on_failure(local("unreserve"))
            .remote_step(command("charge"), name="charge", timeout=10, retry=RetryPolicy(max_attempts=3))
            .commit()
        )

    first = process("first")
    await first.setup()
    execution = await first.run(first.registry.get("restart", 3), {"n": 7}, pause_on_disk=True)
    await first.destroy()  # the process is gone; only storage remembers

    clock.advance(11)
    second = process("second")
    await second.setup()
    assert (await SagaRecoveryWorker(second).run_once()).recovered == [execution.id]
    await second.destroy()
    assert charges() == 2

    clock.advance(11)
    third = process("third")
    await third.setup()
    try:
        assert (await SagaRecoveryWorker(third).run_once()).recovered == [execution.id]  # attempt 3
        clock.advance(11)
        assert (await SagaRecoveryWorker(third).run_once()).recovered == [execution.id]  # exhausted
    finally:
        await third.destroy()
    record = await storage.load(execution.id)
    assert record.status is SagaStatus.ERRORED and record.error is not None
    assert record.error["type"] == "timeout"
    assert charges() == 3, "attempts are counted from storage across restarts"
    assert calls == Counter({"reserve": 1, "unreserve": 1})
    assert record.owner is None


async def test_the_background_worker_drives_timeouts_in_real_time(pool: InMemoryBrokerPool) -> None:
    storage = MemorySagaStorage()
    manager = new_manager(storage, pool)
    saga = (
        Saga("live")
        .local_step(local("reserve"))
        .on_failure(local("unreserve"))
        .remote_step(command("charge"), name="charge", timeout=0.15, retry=RetryPolicy(max_attempts=2))
        .commit()
    )
    await manager.setup()
    worker = SagaRecoveryWorker(manager, interval=0.02)
    await worker.start()
    try:
        answered = await manager.run(saga, {"n": 1}, pause_on_disk=True)
        silent = await manager.run(saga, {"n": 2}, pause_on_disk=True)
        # Answer only the replay of the first saga; leave the second one without any reply.
        deadline = time.monotonic() + 5
        while len([c for c in sent(pool, "charge") if c.execution_id == answered.id]) < 2:
            assert time.monotonic() < deadline, "the overdue step was not replayed"
            await asyncio.sleep(0.01)
        replay = [c for c in sent(pool, "charge") if c.execution_id == answered.id][1]
        assert await manager.handle_reply(reply_to(replay)) == "applied"
        while (await storage.load(silent.id)).status is not SagaStatus.ERRORED:
            assert time.monotonic() < deadline, "the silent saga was not compensated"
            await asyncio.sleep(0.01)
    finally:
        await worker.stop()
        await manager.destroy()
    assert (await storage.load(answered.id)).status is SagaStatus.FINISHED
    assert calls == Counter({"reserve": 2, "unreserve": 1})
    assert len([c for c in sent(pool, "charge") if c.execution_id == silent.id]) == 2
    assert worker.stats.failed == 0


async def test_recovery_ignores_a_reply_for_an_execution_it_no_longer_awaits(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock, manager: SagaManager
) -> None:
    saga = Saga("forged").remote_step(command("charge"), name="charge", timeout=5).commit()
    execution = await manager.run(saga, pause_on_disk=True)
    (charge,) = sent(pool, "charge")
    other = SagaResponse(None, 200, execution.id, uuid.uuid4(), "svc")  # a request never sent
    assert await manager.handle_reply(other) == "stale"
    assert (await storage.load(execution.id)).status is SagaStatus.PAUSED
    clock.advance(6)
    await SagaRecoveryWorker(manager).run_once()  # no retry policy: compensated at once (nothing to undo)
    assert (await storage.load(execution.id)).status is SagaStatus.ERRORED
    assert await manager.handle_reply(reply_to(charge)) == "stale"
    assert (await storage.load(execution.id)).status is SagaStatus.ERRORED


# -- a timeout replay racing the reply, in one process --------------------------------------------------


class SlowClaims(MemorySagaStorage):
    """Memory storage whose claims and saves take a moment, as database round trips do."""

    async def claim(self, saga_id: uuid.UUID, owner: str, *, lease_seconds: float) -> Any:
        await asyncio.sleep(0.01)
        return await super().claim(saga_id, owner, lease_seconds=lease_seconds)

    async def save(self, record: Any, **options: Any) -> Any:
        await asyncio.sleep(0.01)
        return await super().save(record, **options)


async def test_recovery_and_a_reply_for_the_same_execution_do_not_drive_it_twice(
    pool: InMemoryBrokerPool, clock: FakeClock
) -> None:
    # The recovery worker replays an overdue step while the reply consumer of the same process applies
    # the (late) reply. Both claim under the process's owner, which the storage cannot tell apart; the
    # process must let only one of them in, and the other must get SagaBusyError (retriable), never a
    # ConcurrencyError from the optimistic save or an internal error that dead-letters the reply.
    storage = SlowClaims(clock=clock)
    manager = new_manager(storage, pool, clock)
    saga = (
        Saga("race")
        .remote_step(command("charge"), name="charge", timeout=5, retry=RetryPolicy(max_attempts=3))
        .local_step(local("ship"))
        .commit()
    )
    await manager.setup()
    try:
        execution = await manager.run(saga, pause_on_disk=True)
        (charge,) = sent(pool, "charge")
        clock.advance(6)
        recovered, replied = await asyncio.gather(
            manager.recover(execution.id), manager.handle_reply(reply_to(charge)), return_exceptions=True
        )
    finally:
        await manager.destroy()
    outcomes = [repr(r) for r in (recovered, replied)]
    assert all(isinstance(r, SagaBusyError) for r in (recovered, replied) if isinstance(r, BaseException)), (
        outcomes
    )
    record = await storage.load(execution.id)
    if replied == "applied":
        assert record.status is SagaStatus.FINISHED and calls["ship"] == 1
    else:  # the reply was turned away as busy (the consumer retries it): the step was replayed meanwhile
        assert record.status is SagaStatus.PAUSED and len(sent(pool, "charge")) == 2
