"""Recovery on the in-memory adapters: `recover_saga` bookkeeping and the `SagaRecoveryWorker` loop.

Time is a controllable clock shared by the storage and the manager, so leases, staleness, step timeouts and
saga deadlines pass without sleeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker import InMemoryBrokerPool
from saga.context import SagaContext
from saga.definitions import Saga
from saga.errors import SagaStateError
from saga.execution import SagaExecution
from saga.hooks import SagaEvent, SagaHooks
from saga.manager import SagaManager
from saga.messages import H_IDEMPOTENCY_KEY, H_REQUEST_ID, SagaRequest
from saga.recovery import SagaRecoveryWorker, recover_saga
from saga.retry import RetryPolicy
from storage import MemorySagaStorage, SagaStatus, StorageUnavailableError


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = datetime(2024, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class ProcessDied(BaseException):
    """Escapes every ``except Exception``: the test's stand-in for a process that died mid-step."""


calls: Counter[str] = Counter()


def count(name: str) -> Callable[[SagaContext], None]:
    def step(context: SagaContext) -> None:
        calls[f"{name}:{context['n']}"] += 1

    step.__name__ = name
    return step


_sagas: dict[str, Saga] = {}


def order_saga(name: str = "order") -> Saga:
    """Three local steps that count their runs; one definition per name and test."""
    if name not in _sagas:
        _sagas[name] = (
            Saga(name)
            .local_step(count("reserve"))
            .local_step(count("charge"))
            .local_step(count("ship"))
            .commit()
        )
    return _sagas[name]


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    _sagas.clear()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def storage(clock: FakeClock) -> MemorySagaStorage:
    return MemorySagaStorage(clock=clock)


@pytest.fixture
def pool() -> InMemoryBrokerPool:
    return InMemoryBrokerPool()


def make_manager(storage: Any, pool: InMemoryBrokerPool, clock: Any = None, **options: Any) -> SagaManager:
    return SagaManager(
        storage, pool, consume_replies=False, relay_outbox=False, clock=clock, lease_seconds=30, **options
    )


@pytest.fixture
async def manager(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock
) -> AsyncIterator[SagaManager]:
    m = make_manager(storage, pool, clock, owner="recoverer")
    await m.setup()
    try:
        yield m
    finally:
        await m.destroy()


async def stalled(
    manager: SagaManager,
    saga: Saga,
    n: int,
    *,
    status: SagaStatus = SagaStatus.RUNNING,
    recovery_attempts: int = 0,
) -> uuid.UUID:
    """Store an execution as a crashed process leaves it: started, unclaimed, nothing run yet."""
    definition = manager.register(saga)
    execution = SagaExecution.start(
        definition, {"n": n}, reply_topic=manager.reply_topic, now=manager.clock()
    )
    record = dataclasses.replace(execution.to_record(), status=status, recovery_attempts=recovery_attempts)
    await manager.storage.create(record)
    return execution.id


async def wait_for(predicate: Callable[[], Awaitable[bool]], *, within: float = 5.0) -> None:
    """Poll ``predicate`` until it holds (the worker runs in the background meanwhile)."""
    deadline = asyncio.get_running_loop().time() + within
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def status_of(storage: Any, saga_id: uuid.UUID) -> SagaStatus:
    return (await storage.load(saga_id)).status  # type: ignore[no-any-return]


# -- resuming ----------------------------------------------------------------------------------------


async def test_worker_resumes_a_run_left_by_a_crashed_manager(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock, manager: SagaManager
) -> None:
    crash = {"armed": True}

    def charge(context: SagaContext) -> None:
        calls[f"charge:{context['n']}"] += 1
        if crash["armed"]:
            crash["armed"] = False
            raise ProcessDied

    saga = Saga("order").local_step(count("reserve")).local_step(charge).local_step(count("ship")).commit()
    crashed = make_manager(storage, pool, clock, owner="crashed")
    await crashed.setup()
    with pytest.raises(ProcessDied):
        await crashed.run(saga, {"n": 1}, pause_on_disk=True)
    [record] = (await storage.query()).rows
    assert record.status is SagaStatus.RUNNING and record.owner == "crashed"

    manager.register(saga)
    worker = SagaRecoveryWorker(manager)
    report = await worker.run_once()
    assert report.claimed == 0  # the dead process's lease still runs

    clock.advance(31)
    report = await worker.run_once()
    assert report.recovered == [record.id]
    stored = await storage.load(record.id)
    assert stored.status is SagaStatus.FINISHED and stored.owner is None
    assert stored.recovery_attempts == 0
    # reserve was stored before the crash; charge ran again (at-least-once); ship ran once.
    assert calls == {"reserve:1": 1, "charge:1": 2, "ship:1": 1}
    assert worker.stats.recovered == 1


async def test_background_loop_recovers_running_failed_and_compensating_runs(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock, manager: SagaManager
) -> None:
    crash = {"armed": True}

    def undo(context: SagaContext) -> None:
        calls[f"undo:{context['n']}"] += 1
        if crash["armed"]:
            crash["armed"] = False
            raise ProcessDied

    def refuse(context: SagaContext) -> None:
        raise ValueError("out of stock")

    failing = Saga("refund").local_step(count("reserve")).on_failure(undo).local_step(refuse).commit()
    crashed = make_manager(storage, pool, clock, owner="crashed")
    await crashed.setup()
    with pytest.raises(ProcessDied):
        await crashed.run(failing, {"n": 3}, pause_on_disk=True)
    [compensating] = (await storage.query()).rows
    assert compensating.status is SagaStatus.COMPENSATING
    await storage.release_claim(compensating.id, "crashed")

    manager.register(failing)
    saga = order_saga()
    running = await stalled(manager, saga, 1)
    failed = await stalled(manager, saga, 2, status=SagaStatus.FAILED)
    async with SagaRecoveryWorker(manager, interval=0.01) as worker:
        await wait_for(lambda: _all_status(storage, [running, failed], SagaStatus.FINISHED))
        await wait_for(lambda: _all_status(storage, [compensating.id], SagaStatus.ERRORED))
    assert not worker.running
    assert worker.stats.recovered == 3 and worker.stats.failed == 0
    assert calls["ship:1"] == calls["ship:2"] == 1
    assert calls["undo:3"] == 2  # the compensation that was cut short ran again, to the end


async def _all_owned(storage: Any, ids: list[uuid.UUID], owner: str) -> bool:
    return all([(await storage.load(i)).owner == owner for i in ids])


async def _all_status(storage: Any, ids: list[uuid.UUID], status: SagaStatus) -> bool:
    return all([await status_of(storage, i) is status for i in ids])


async def test_run_once_with_nothing_to_do(manager: SagaManager) -> None:
    report = await SagaRecoveryWorker(manager).run_once()
    assert report.claimed == 0 and report.results == () and report.outage is None


async def test_busy_execution_is_skipped_without_counting(
    storage: MemorySagaStorage, manager: SagaManager
) -> None:
    saga_id = await stalled(manager, order_saga(), 1)
    await storage.claim(saga_id, "someone-else", lease_seconds=30)
    assert await recover_saga(manager, saga_id) is None
    record = await storage.load(saga_id)
    assert record.recovery_attempts == 0 and record.status is SagaStatus.RUNNING
    assert record.owner == "someone-else"


async def test_recover_saga_returns_the_resumed_execution(manager: SagaManager) -> None:
    saga_id = await stalled(manager, order_saga(), 1)
    execution = await recover_saga(manager, saga_id)
    assert execution is not None and execution.id == saga_id and execution.status is SagaStatus.FINISHED


# -- failures, attempts, dead letters ------------------------------------------------------------------


async def broken_row(manager: SagaManager, n: int, **changes: Any) -> uuid.UUID:
    """An execution whose state document this engine cannot read (a format from the future)."""
    saga_id = await stalled(manager, order_saga(), n)
    record = await manager.storage.load(saga_id)
    manager.storage._executions[saga_id] = dataclasses.replace(record, state=b'{"v": 99}', **changes)  # type: ignore[attr-defined]
    return saga_id


async def test_failing_recovery_counts_an_attempt_and_sets_failed(
    storage: MemorySagaStorage, manager: SagaManager
) -> None:
    saga_id = await broken_row(manager, 1)
    with pytest.raises(SagaStateError, match="unknown state format"):
        await recover_saga(manager, saga_id)
    record = await storage.load(saga_id)
    assert record.status is SagaStatus.FAILED
    assert record.recovery_attempts == 1
    assert record.owner is None  # released, so the next pass may try again

    report = await SagaRecoveryWorker(manager).run_once()
    [result] = report.results
    assert result.outcome == "failed" and result.attempts == 2
    assert result.error == {"type": "SagaStateError", "message": "unknown state format 99"}


async def test_an_unregistered_definition_is_not_an_attempt_and_recovers_once_registered(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock, manager: SagaManager
) -> None:
    saga = Saga("invoice").local_step(count("bill")).commit()
    other = make_manager(storage, pool, clock, owner="other")
    other.register(saga)  # started by a service that knows the saga; `manager` does not (yet)
    execution = SagaExecution.start(saga, {"n": 7}, reply_topic="r", now=clock())
    await storage.create(execution.to_record())
    saga_id = execution.id

    worker = SagaRecoveryWorker(manager, max_recovery_attempts=3)
    outcomes = [(await worker.run_once()).results[0].outcome for _ in range(4)]
    assert outcomes == ["released"] * 4
    record = await storage.load(saga_id)
    assert record.status is SagaStatus.RUNNING and record.recovery_attempts == 0
    assert record.owner is None and record.error is None
    assert worker.stats.failed == 0 and worker.stats.dead_lettered == 0

    manager.register(saga)  # the definition is deployed
    report = await worker.run_once()
    assert report.recovered == [saga_id]
    assert (await storage.load(saga_id)).status is SagaStatus.FINISHED
    assert calls["bill:7"] == 1


async def test_dead_lettering_tells_the_managers_hooks(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock
) -> None:
    events: list[SagaEvent] = []
    hooks = SagaHooks(on_status_changed=events.append, on_dead_lettered=events.append)
    manager = make_manager(storage, pool, clock, owner="recoverer", hooks=hooks)
    saga_id = await broken_row(manager, 1, recovery_attempts=1)
    with pytest.raises(SagaStateError):
        await recover_saga(manager, saga_id, max_recovery_attempts=2)
    assert [(e.hook, e.status, e.previous_status) for e in events] == [
        ("on_status_changed", SagaStatus.DEAD_LETTER, SagaStatus.FAILED),
        ("on_dead_lettered", SagaStatus.DEAD_LETTER, SagaStatus.FAILED),
    ]
    assert events[1].execution_id == saga_id and events[1].saga == "order"
    assert events[1].error is not None and events[1].error["type"] == "recovery_exhausted"


async def test_set_recovery_attempts_zero_makes_an_exhausted_run_eligible(
    storage: MemorySagaStorage, manager: SagaManager
) -> None:
    saga_id = await stalled(manager, order_saga(), 1, status=SagaStatus.FAILED, recovery_attempts=5)
    worker = SagaRecoveryWorker(manager, max_recovery_attempts=5)
    assert (await worker.run_once()).claimed == 0
    await storage.set_recovery_attempts(saga_id, 0)
    assert (await worker.run_once()).recovered == [saga_id]
    assert (await storage.load(saga_id)).status is SagaStatus.FINISHED


async def test_dead_letter_respects_a_retry_that_lands_in_between(
    storage: MemorySagaStorage, manager: SagaManager
) -> None:
    """The count is fenced by the version read: a person's retry right after the worker read the row wins,
    and the worker's failure is not counted over it."""
    saga_id = await broken_row(manager, 1, recovery_attempts=2)
    real_load = storage.load

    async def load_then_retry(sid: uuid.UUID) -> Any:
        record = await real_load(sid)
        await storage.set_recovery_attempts(sid, 0)  # a person's retry, right after the failure
        return record

    storage.load = load_then_retry  # type: ignore[method-assign]
    report = await SagaRecoveryWorker(manager, max_recovery_attempts=3).run_once()
    assert report.results[0].outcome == "busy"
    storage.load = real_load  # type: ignore[method-assign]
    record = await storage.load(saga_id)
    assert record.status is SagaStatus.RUNNING and record.recovery_attempts == 0


async def test_dead_letter_is_fenced_by_the_version_read(
    storage: MemorySagaStorage, manager: SagaManager
) -> None:
    """Another writer moving the version between the read and the DEAD_LETTER write: nothing is written."""
    saga_id = await broken_row(manager, 1, recovery_attempts=2)
    real_save = storage.save
    interfered = []

    async def save_after_someone_else(record: Any, **kw: Any) -> Any:
        if record.status is SagaStatus.DEAD_LETTER and not interfered:
            interfered.append(True)
            await storage.increment_recovery_attempts(record.id)  # another writer moves the version on
        return await real_save(record, **kw)

    storage.save = save_after_someone_else  # type: ignore[method-assign]
    report = await SagaRecoveryWorker(manager, max_recovery_attempts=3).run_once()
    assert report.results[0].outcome == "busy"
    record = await storage.load(saga_id)
    assert record.status is SagaStatus.RUNNING and record.recovery_attempts == 3
    assert interfered == [True]


async def test_dead_letter_is_left_to_the_worker_holding_the_claim(
    storage: MemorySagaStorage, manager: SagaManager
) -> None:
    saga_id = await broken_row(manager, 1, recovery_attempts=2)
    real_load = storage.load

    async def load_then_claimed(sid: uuid.UUID) -> Any:
        await storage.release_claim(sid, manager.owner)
        await storage.claim(sid, "another-worker", lease_seconds=30)
        return await real_load(sid)

    storage.load = load_then_claimed  # type: ignore[method-assign]
    assert await recover_saga(manager, saga_id, max_recovery_attempts=3) is None  # not ours: not counted
    storage.load = real_load  # type: ignore[method-assign]
    record = await storage.load(saga_id)
    assert record.status is SagaStatus.RUNNING and record.owner == "another-worker"
    assert record.recovery_attempts == 2


async def test_a_finished_saga_is_never_moved_back(storage: MemorySagaStorage, manager: SagaManager) -> None:
    """A recovery that fails after another worker finished the saga counts nothing and leaves it FINISHED."""
    saga_id = await broken_row(manager, 1)
    real_load = storage.load

    async def load_finished(sid: uuid.UUID) -> Any:
        await storage.release_claim(sid, manager.owner)
        current = await real_load(sid)
        return await storage.save(dataclasses.replace(current, status=SagaStatus.FINISHED))

    storage.load = load_finished  # type: ignore[method-assign]
    report = await SagaRecoveryWorker(manager, max_recovery_attempts=1).run_once()
    assert report.results[0].outcome == "busy"
    storage.load = real_load  # type: ignore[method-assign]
    record = await storage.load(saga_id)
    assert record.status is SagaStatus.FINISHED and record.recovery_attempts == 0


# -- selection and robustness --------------------------------------------------------------------------


async def test_saga_names_filter(storage: MemorySagaStorage, manager: SagaManager) -> None:
    alpha = await stalled(manager, order_saga("alpha"), 1)
    beta = await stalled(manager, order_saga("beta"), 2)
    gamma = await stalled(manager, order_saga("gamma"), 3)
    worker = SagaRecoveryWorker(manager, saga_names=["alpha", "gamma"])
    report = await worker.run_once()
    assert sorted(report.recovered) == sorted([alpha, gamma])
    assert await status_of(storage, beta) is SagaStatus.RUNNING
    assert (await worker.run_once()).claimed == 0


async def test_saga_names_share_the_batch_fairly(manager: SagaManager) -> None:
    for n in range(4):
        await stalled(manager, order_saga("alpha"), n)
        await stalled(manager, order_saga("beta"), 10 + n)
    worker = SagaRecoveryWorker(manager, saga_names=["alpha", "beta"], batch_size=3)
    first = await worker.run_once()
    second = await worker.run_once()
    names = Counter([(await manager.storage.load(i)).name for r in (first, second) for i in r.recovered])
    assert first.claimed == second.claimed == 3
    assert names["alpha"] >= 2 and names["beta"] >= 2  # the second pass starts with beta


async def test_broken_rows_do_not_stop_the_loop(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock, manager: SagaManager
) -> None:
    unknown = Saga("unregistered").local_step(count("x")).commit()
    execution = SagaExecution.start(unknown, {"n": 0}, reply_topic="r", now=clock())
    await storage.create(execution.to_record())
    corrupt = await broken_row(manager, 1)
    good = [await stalled(manager, order_saga(), n) for n in range(2, 6)]

    async with SagaRecoveryWorker(manager, interval=0.01, max_recovery_attempts=2) as worker:
        await wait_for(lambda: _all_status(storage, good, SagaStatus.FINISHED))
        await wait_for(lambda: _all_status(storage, [corrupt], SagaStatus.DEAD_LETTER))
        assert worker.running
    assert worker.stats.recovered == 4
    assert worker.stats.failed == 2 and worker.stats.dead_lettered == 1
    assert worker.stats.errors == 0
    # An execution of a definition this process lacks waits, uncounted, for one that has it.
    waiting = await storage.load(execution.id)
    assert waiting.status is SagaStatus.RUNNING and waiting.recovery_attempts == 0


class FlakyStorage:
    """Delegates to a real storage; the next ``failures`` calls (of ``methods``, or any) raise an outage."""

    def __init__(self, inner: MemorySagaStorage, methods: frozenset[str] | None = None) -> None:
        self.inner = inner
        self.methods = methods
        self.failures = 0
        self.failed_calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if name in ("start", "stop") or not callable(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.failures > 0 and (self.methods is None or name in self.methods):
                self.failures -= 1
                self.failed_calls[name] += 1
                raise StorageUnavailableError(f"database unreachable during {name}")
            return await target(*args, **kwargs)

        return call


async def test_a_storage_outage_is_ridden_out_with_backoff(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakyStorage(storage)
    manager = make_manager(flaky, pool, clock, owner="recoverer")
    await manager.setup()
    try:
        ids = [await stalled(manager, order_saga(), n) for n in range(3)]
        flaky.failures = 6
        worker = SagaRecoveryWorker(manager, interval=0.01, retry_initial=0.01, retry_max=0.04)
        with caplog.at_level(logging.INFO, logger="saga.recovery"):
            async with worker:
                await wait_for(lambda: _all_status(storage, ids, SagaStatus.FINISHED))
    finally:
        await manager.destroy()
    assert flaky.failed_calls["claim_for_recovery"] == 6
    assert worker.stats.outages == 1 and worker.stats.recovered == 3 and worker.stats.failed == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("database unavailable" in m for m in messages) == 1  # once per outage, not per retry
    assert sum("database available again" in m for m in messages) == 1
    assert [(await storage.load(i)).recovery_attempts for i in ids] == [0, 0, 0]


def test_backoff_is_capped_and_jittered(manager: SagaManager) -> None:
    worker = SagaRecoveryWorker(manager, retry_initial=0.5, retry_max=4.0)
    delays = [worker._backoff(n) for n in range(1, 10)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(2.0 <= d <= 4.0 for d in delays[4:])
    assert len({round(d, 6) for d in delays}) > 1


async def test_an_outage_during_a_recovery_counts_no_attempt(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock
) -> None:
    flaky = FlakyStorage(storage, methods=frozenset({"claim"}))
    manager = make_manager(flaky, pool, clock, owner="recoverer")
    await manager.setup()
    try:
        saga_id = await stalled(manager, order_saga(), 1)
        flaky.failures = 1
        worker = SagaRecoveryWorker(manager)
        report = await worker.run_once()
        assert [r.outcome for r in report.results] == ["outage"] and report.outage is not None
        record = await storage.load(saga_id)
        assert record.recovery_attempts == 0 and record.status is SagaStatus.RUNNING
        assert record.owner is None  # released once the database answered again
        assert (await worker.run_once()).recovered == [saga_id]
    finally:
        await manager.destroy()


# -- timeouts and deadlines ----------------------------------------------------------------------------


def reserve_request(context: SagaContext) -> SagaRequest:
    return SagaRequest("payments", {"n": context["n"]})


def undo_reserve(context: SagaContext) -> None:
    calls[f"undo:{context['n']}"] += 1


async def test_overdue_reply_is_replayed_per_retry_policy_then_compensated(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, clock: FakeClock, manager: SagaManager
) -> None:
    saga = (
        Saga("pay")
        .local_step(count("reserve"))
        .on_failure(undo_reserve)
        .remote_step(reserve_request, name="charge", timeout=10, retry=RetryPolicy(max_attempts=3))
        .commit()
    )
    execution = await manager.run(saga, {"n": 1}, pause_on_disk=True)
    assert execution.status is SagaStatus.PAUSED
    worker = SagaRecoveryWorker(manager)

    clock.advance(5)
    assert (await worker.run_once()).claimed == 0  # not overdue yet

    for attempt in (2, 3):
        clock.advance(11)
        report = await worker.run_once()
        assert report.recovered == [execution.id]
        record = await storage.load(execution.id)
        assert record.status is SagaStatus.PAUSED
        assert record.steps[-1].attempts == attempt

    commands = pool.topic_messages("payments")
    assert len(commands) == 3
    assert len({m.headers[H_REQUEST_ID] for m in commands}) == 1  # a replay, not a new request
    assert len({m.headers[H_IDEMPOTENCY_KEY] for m in commands}) == 1

    clock.advance(11)
    report = await worker.run_once()
    assert report.recovered == [execution.id]
    record = await storage.load(execution.id)
    assert record.status is SagaStatus.ERRORED
    assert record.error is not None and record.error["type"] == "timeout"
    assert calls["undo:1"] == 1
    assert len(pool.topic_messages("payments")) == 3
    assert record.recovery_attempts == 0


async def test_saga_deadline_compensates_a_paused_run(
    storage: MemorySagaStorage, clock: FakeClock, manager: SagaManager
) -> None:
    saga = (
        Saga("deadline", deadline=60)
        .local_step(count("reserve"))
        .on_failure(undo_reserve)
        .remote_step(reserve_request, name="charge")
        .commit()
    )
    execution = await manager.run(saga, {"n": 1}, pause_on_disk=True)
    worker = SagaRecoveryWorker(manager)
    clock.advance(30)
    assert (await worker.run_once()).claimed == 0
    clock.advance(31)
    assert (await worker.run_once()).recovered == [execution.id]
    record = await storage.load(execution.id)
    assert record.status is SagaStatus.ERRORED
    assert record.error is not None and record.error["type"] == "deadline"
    assert calls["undo:1"] == 1


async def test_saga_deadline_compensates_a_stalled_running_run(
    storage: MemorySagaStorage, clock: FakeClock, manager: SagaManager
) -> None:
    saga = (
        Saga("deadline2", deadline=60)
        .local_step(count("reserve"))
        .on_failure(undo_reserve)
        .local_step(count("ship"))
        .commit()
    )
    saga_id = await stalled(manager, saga, 1)
    clock.advance(61)
    assert (await SagaRecoveryWorker(manager).run_once()).recovered == [saga_id]
    record = await storage.load(saga_id)
    assert record.status is SagaStatus.ERRORED
    assert record.error is not None and record.error["type"] == "deadline"
    assert calls["ship:1"] == 0


# -- leases and shutdown -------------------------------------------------------------------------------


async def test_queued_claims_keep_their_lease_until_handed_over(pool: InMemoryBrokerPool) -> None:
    storage = MemorySagaStorage()  # the real clock: leases run out while the test waits
    manager = SagaManager(
        storage, pool, consume_replies=False, relay_outbox=False, lease_seconds=0.3, owner="a"
    )
    rival = SagaManager(
        storage, pool, consume_replies=False, relay_outbox=False, lease_seconds=0.3, owner="b"
    )

    async def slow(context: SagaContext) -> None:
        calls[f"slow:{context['n']}"] += 1
        await asyncio.sleep(0.25)

    saga = Saga("slow").local_step(slow).commit()
    rival.register(saga)
    await manager.setup()
    await rival.setup()
    try:
        ids = [await stalled(manager, saga, n) for n in range(4)]
        worker = SagaRecoveryWorker(manager, concurrency=1)
        first = asyncio.create_task(worker.run_once())
        await wait_for(lambda: _all_owned(storage, ids, "a"))
        rival_claims = 0
        while not first.done():
            rival_claims += (await SagaRecoveryWorker(rival).run_once()).claimed
            await asyncio.sleep(0.02)
        report = await first
    finally:
        await rival.destroy()
        await manager.destroy()
    assert rival_claims == 0
    assert sorted(report.recovered) == sorted(ids)
    assert all(calls[f"slow:{n}"] == 1 for n in range(4))


async def test_stop_drains_running_recoveries_and_releases_the_rest(
    storage: MemorySagaStorage, manager: SagaManager
) -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    async def gated(context: SagaContext) -> None:
        started.set()
        await gate.wait()
        calls[f"gated:{context['n']}"] += 1

    saga = Saga("gated").local_step(gated).commit()
    ids = [await stalled(manager, saga, n) for n in range(3)]
    worker = SagaRecoveryWorker(manager, concurrency=1, interval=0.01)
    await worker.start()
    await asyncio.wait_for(started.wait(), 5)
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0.02)
    assert not stopping.done()  # waits for the recovery in progress
    gate.set()
    await asyncio.wait_for(stopping, 5)
    statuses = Counter([await status_of(storage, i) for i in ids])
    assert statuses == {SagaStatus.FINISHED: 1, SagaStatus.RUNNING: 2}
    assert [(await storage.load(i)).owner for i in ids] == [None, None, None]
    assert worker.stats.recovered == 1 and worker.stats.released == 2


async def test_stop_grace_cancels_a_recovery_that_takes_too_long(manager: SagaManager) -> None:
    started = asyncio.Event()

    async def forever(context: SagaContext) -> None:
        started.set()
        await asyncio.Event().wait()

    saga = Saga("forever").local_step(forever).commit()
    await stalled(manager, saga, 1)
    worker = SagaRecoveryWorker(manager, interval=0.01)
    await worker.start()
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(worker.stop(grace=0.05), 5)
    assert not worker.running


def test_options_are_validated(manager: SagaManager) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        SagaRecoveryWorker(manager, batch_size=0)
    with pytest.raises(ValueError, match="interval"):
        SagaRecoveryWorker(manager, interval=0)
    with pytest.raises(TypeError, match="saga_names"):
        SagaRecoveryWorker(manager, saga_names="alpha")
    assert SagaRecoveryWorker(manager).lease_seconds == manager.lease_seconds


async def test_a_full_backlog_drains_without_waiting_for_the_interval(
    storage: MemorySagaStorage, manager: SagaManager
) -> None:
    ids = [await stalled(manager, order_saga(), n) for n in range(7)]
    async with SagaRecoveryWorker(manager, interval=60, batch_size=2) as worker:
        await wait_for(lambda: _all_status(storage, ids, SagaStatus.FINISHED), within=2)
    assert worker.stats.batches == 4 and worker.stats.recovered == 7


async def test_a_full_batch_of_failures_waits_for_the_interval(
    storage: MemorySagaStorage, manager: SagaManager
) -> None:
    ids = [await broken_row(manager, n) for n in range(2)]
    async with SagaRecoveryWorker(manager, interval=60, batch_size=2) as worker:
        await wait_for(lambda: _all_status(storage, ids, SagaStatus.FAILED))
        await asyncio.sleep(0.1)
    assert worker.stats.batches == 1
    assert [(await storage.load(i)).recovery_attempts for i in ids] == [1, 1]
