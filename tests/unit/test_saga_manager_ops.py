"""SagaManager operations on stored executions: decisions, replay, recover, retry, claims, hooks, wiring."""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any

import pytest
from dependency_injector import containers, providers

from broker import InMemoryBrokerPool
from saga import (
    RetryPolicy,
    Saga,
    SagaBusyError,
    SagaConfigError,
    SagaContext,
    SagaDefinitionError,
    SagaEvent,
    SagaExecution,
    SagaHooks,
    SagaManager,
    SagaRequest,
    SagaResponse,
    SagaStateError,
    SagaStatus,
    UnknownSagaDefinitionError,
)
from saga.messages import SagaCommand, SagaControl
from storage import ExecutionNotFoundError, ReplyRecord
from storage.memory import MemorySagaStorage
from tests.unit.conftest import FakeClock, FakeParticipant, add, eventually


def send(topic: str) -> Any:
    def build(ctx: SagaContext) -> SagaRequest:
        return SagaRequest(topic, {"n": ctx.get("n")})

    build.__name__ = f"send_{topic}"
    return build


def quiet_manager(storage: MemorySagaStorage, pool: InMemoryBrokerPool, **kwargs: Any) -> SagaManager:
    """A manager that neither consumes replies nor relays: the test drives everything."""
    options: dict[str, Any] = {"consume_replies": False, "relay_outbox": False, "owner": "quiet"}
    options.update(kwargs)
    return SagaManager(storage, pool, **options)


def decisions(pool: InMemoryBrokerPool, service: str) -> list[str]:
    return [SagaControl.from_message(m).action for m in pool.topic_messages(f"{service}SagaControl")]


async def test_manual_commit_and_reject_are_sent_once(manager: SagaManager, pool: InMemoryBrokerPool) -> None:
    ok = Saga("manual").remote_step(send("a")).commit()
    bad = Saga("manual_bad").remote_step(send("b")).commit()
    async with (
        FakeParticipant(pool, "svc", ["a"]),
        FakeParticipant(pool, "other", ["b"], lambda c: (500, None)),
    ):
        finished = await manager.run(ok, autocommit=False)
        errored = await manager.run(bad, autocommit=False, raise_on_error=False)
    assert decisions(pool, "svc") == [] and decisions(pool, "other") == []
    with pytest.raises(SagaStateError, match="cannot reject"):
        await manager.reject(finished.id)
    with pytest.raises(SagaStateError, match="cannot commit"):
        await manager.commit(errored.id)
    await manager.commit(finished.id)
    await manager.commit(finished.id)
    await manager.reject(errored.id)
    await manager.reject(errored.id)
    assert decisions(pool, "svc") == ["commit"]
    assert decisions(pool, "other") == ["reject"]
    assert (await manager.get(finished.id)).decision_sent


async def test_replay_resends_with_the_same_request_id_and_key(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    manager = quiet_manager(storage, pool)
    await manager.setup()
    try:
        saga = Saga("replay").remote_step(send("slow")).commit()
        paused = await manager.run(saga, pause_on_disk=True)
        replayed = await manager.replay(paused.id)
        first, second = (SagaCommand.from_message(m) for m in pool.topic_messages("slow"))
        assert (first.request_id, first.idempotency_key) == (second.request_id, second.idempotency_key)
        assert replayed.status is SagaStatus.PAUSED and replayed.steps[0].attempts == 2
        stored = await storage.load(paused.id)
        assert stored.steps[0].attempts == 2 and stored.owner is None
    finally:
        await manager.destroy()


async def test_replay_refuses_a_finished_execution(manager: SagaManager) -> None:
    finished = await manager.run(Saga("fin").local_step(add("a", 1)).commit())
    with pytest.raises(SagaStateError, match="not paused"):
        await manager.replay(finished.id)
    assert (await manager.storage.load(finished.id)).owner is None


async def test_unknown_definition_on_resume_leaves_the_execution_untouched(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    starter = quiet_manager(storage, pool, owner="starter")
    await starter.setup()
    saga = Saga("known_elsewhere").remote_step(send("x")).commit()
    paused = await starter.run(saga, pause_on_disk=True)
    before = await storage.load(paused.id)
    other = quiet_manager(storage, InMemoryBrokerPool(), owner="other")
    await other.setup()
    assert paused.awaiting is not None
    response = SagaResponse(None, 200, paused.id, paused.awaiting.request_id, "svc")
    with pytest.raises(UnknownSagaDefinitionError, match="'known_elsewhere' version 1") as info:
        await other.run(response=response)
    assert info.value.execution_id == paused.id
    after = await storage.load(paused.id)
    assert (after.status, after.state, after.steps, after.owner) == (
        before.status,
        before.state,
        before.steps,
        None,
    )
    assert await storage.list_replies(paused.id) == []
    with pytest.raises(UnknownSagaDefinitionError):
        await other.get(paused.id)
    with pytest.raises(ExecutionNotFoundError):
        await other.handle_reply(SagaResponse(None, 200, uuid.uuid4(), uuid.uuid4()))
    await starter.destroy()


async def test_busy_when_another_owner_holds_the_claim(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    manager = quiet_manager(storage, pool)
    await manager.setup()
    try:
        paused = await manager.run(Saga("busy").remote_step(send("x")).commit(), pause_on_disk=True)
        assert await storage.claim(paused.id, "someone-else", lease_seconds=60) is not None
        assert paused.awaiting is not None
        response = SagaResponse(None, 200, paused.id, paused.awaiting.request_id, "svc")
        with pytest.raises(SagaBusyError) as info:
            await manager.handle_reply(response)
        assert info.value.retriable and info.value.execution_id == paused.id
        with pytest.raises(SagaBusyError):
            await manager.recover(paused.id)
        with pytest.raises(SagaBusyError):
            await manager.replay(paused.id)
        await storage.release_claim(paused.id, "someone-else")
        assert await manager.handle_reply(response) == "applied"
    finally:
        await manager.destroy()


async def test_heartbeat_keeps_the_claim_during_a_long_step(pool: InMemoryBrokerPool) -> None:
    storage = MemorySagaStorage()  # real clock: leases really run out
    manager = quiet_manager(storage, pool, lease_seconds=0.15)
    await manager.setup()
    rival_results: list[object] = []
    started = asyncio.Event()

    async def long_step(ctx: SagaContext) -> None:
        started.set()
        await asyncio.sleep(0.5)

    async def rival(execution_id_box: list[uuid.UUID]) -> None:
        await started.wait()
        for _ in range(8):
            await asyncio.sleep(0.05)
            [record] = (await storage.query()).rows
            rival_results.append(await storage.claim(record.id, "rival", lease_seconds=1))

    try:
        task = asyncio.create_task(rival([]))
        execution = await manager.run(Saga("long").local_step(long_step).commit())
        await task
    finally:
        await manager.destroy()
    assert execution.status is SagaStatus.FINISHED
    assert rival_results and all(result is None for result in rival_results)


async def test_lost_claim_stops_without_saving(pool: InMemoryBrokerPool) -> None:
    storage = MemorySagaStorage()
    manager = quiet_manager(storage, pool, lease_seconds=0.09)
    await manager.setup()

    async def long_step(ctx: SagaContext) -> None:
        [record] = (await storage.query()).rows
        await storage.release_claim(record.id, "quiet")
        assert await storage.claim(record.id, "thief", lease_seconds=60) is not None
        await asyncio.sleep(0.1)  # a beat passes: renewal fails

    with pytest.raises(SagaBusyError, match="claim lost"):
        await manager.run(Saga("stolen").local_step(long_step).local_step(add("b", 1)).commit())
    [record] = (await storage.query()).rows
    assert record.status is SagaStatus.RUNNING and record.steps == () and record.owner == "thief"
    await manager.destroy()


async def test_hooks_are_called_and_a_raising_hook_changes_nothing(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool
) -> None:
    events: list[tuple[str, str | None]] = []

    async def record(event: SagaEvent) -> None:
        events.append((event.hook, event.step))

    def explode(event: SagaEvent) -> None:
        raise RuntimeError("hook bug")

    hooks = SagaHooks(
        on_step_started=explode,
        on_step_completed=record,
        on_step_failed=record,
        on_compensation_started=record,
        on_compensation_completed=record,
        on_compensation_failed=record,
        on_status_changed=lambda event: events.append((event.hook, str(event.status))),
        on_dead_lettered=record,
    )
    manager = quiet_manager(storage, pool, hooks=hooks)
    await manager.setup()
    saga = (
        Saga("hooked", compensation_retry=RetryPolicy(max_attempts=1))
        .local_step(add("a", 1))
        .on_failure(add("undone", 1))
        .local_step(lambda ctx: 1 / 0, name="explode")
        .commit()
    )
    execution = await manager.run(saga, raise_on_error=False)
    assert execution.status is SagaStatus.ERRORED
    assert events == [
        ("on_step_completed", "add_a"),
        ("on_step_failed", "explode"),
        ("on_status_changed", "compensating"),
        ("on_compensation_started", "add_a"),
        ("on_compensation_completed", "add_a"),
        ("on_status_changed", "errored"),
    ]
    events.clear()
    dead = (
        Saga("hooked_dead")
        .local_step(add("a", 1))
        .on_failure(lambda ctx: 1 / 0)
        .local_step(lambda ctx: 1 / 0, name="explode")
        .commit()
    )
    await manager.run(dead, raise_on_error=False)
    assert ("on_compensation_failed", "add_a") in events and ("on_dead_lettered", None) in events


def test_provide_marker_without_a_container_is_a_clear_error(storage: MemorySagaStorage) -> None:
    with pytest.raises(SagaConfigError, match=r"broker_pool.*unresolved dependency-injector marker") as info:
        SagaManager(storage)
    assert info.value.key == "broker_pool"
    with pytest.raises(SagaConfigError, match="lease_seconds"):
        SagaManager(storage, InMemoryBrokerPool(), lease_seconds=0)
    with pytest.raises(SagaConfigError, match="service_name"):
        SagaManager(storage, InMemoryBrokerPool(), service_name="")
    with pytest.raises(SagaConfigError, match="reply_concurrency: must be >= 1, got 0"):
        SagaManager(storage, InMemoryBrokerPool(), reply_concurrency=0)


def test_a_wired_container_provides_the_broker_pool(storage: MemorySagaStorage) -> None:
    pool = InMemoryBrokerPool()

    class Container(containers.DeclarativeContainer):
        broker_pool = providers.Object(pool)

    container = Container()
    container.wire(modules=[sys.modules["saga.manager"]])
    try:
        manager = SagaManager(storage)
        assert manager.broker_pool is pool
        explicit = InMemoryBrokerPool()
        assert SagaManager(storage, broker_pool=explicit).broker_pool is explicit
    finally:
        container.unwire()


def test_defaults_derive_from_the_service_name(storage: MemorySagaStorage) -> None:
    manager = SagaManager(storage, InMemoryBrokerPool(), service_name="orders")
    assert manager.reply_topic == "ordersReply" and manager.dead_letter_topic == "ordersDeadLetter"
    assert manager.consumer_group == "orders-orchestrator"
    assert manager.owner.count(":") == 2


def test_from_config_delegates_to_the_config_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import saga.config

    sentinel = object()
    seen: list[object] = []

    def fake_build(source: object) -> object:
        seen.append(source)
        return sentinel

    monkeypatch.setattr(saga.config, "build_manager", fake_build)
    assert SagaManager.from_config({"service": {"name": "x"}}) is sentinel
    assert seen == [{"service": {"name": "x"}}]


async def test_register_conflicts_and_get(manager: SagaManager) -> None:
    open_saga = Saga("reg")
    open_saga.local_step(add("a", 1))
    open_saga.commit()
    saga = manager.register(open_saga)
    assert saga is open_saga and saga.committed
    with pytest.raises(SagaDefinitionError):
        manager.register(Saga("reg").local_step(add("a", 1)).commit())
    execution = await manager.run(saga)
    got = await manager.get(execution.id)
    assert got.status is SagaStatus.FINISHED and got.context == {"a": 1}


async def test_recover_resumes_a_crashed_run_and_compensating_runs(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    clock = FakeClock()
    manager = quiet_manager(storage, pool, clock=clock)
    await manager.setup()
    calls: list[str] = []

    class Crash(BaseException):
        pass

    crash = {"armed": True}

    def second(ctx: SagaContext) -> None:
        calls.append("second")
        if crash["armed"]:
            crash["armed"] = False
            raise Crash

    saga = Saga("crash").local_step(add("a", 1)).local_step(second).local_step(add("c", 3)).commit()
    with pytest.raises(Crash):
        await manager.run(saga)
    [record] = (await storage.query()).rows
    assert record.status is SagaStatus.RUNNING and [s.name for s in record.steps] == ["add_a"]
    recovered = await manager.recover(record.id)
    assert recovered.status is SagaStatus.FINISHED and calls == ["second", "second"]
    assert recovered.context == {"a": 1, "c": 3}
    assert (await storage.load(record.id)).owner is None
    again = await manager.recover(record.id)  # terminal: nothing to do
    assert again.status is SagaStatus.FINISHED

    # A run that crashed while compensating resumes its compensation.
    undone: list[str] = []
    comp = (
        Saga("crash_comp")
        .local_step(add("a", 1))
        .on_failure(lambda ctx: undone.append("a"))
        .local_step(add("b", 1))
        .on_failure(lambda ctx: undone.append("b"))
        .commit()
    )
    manager.register(comp)
    execution = SagaExecution.start(comp, None, reply_topic=manager.reply_topic, now=clock())
    await execution.advance(clock())
    await execution.advance(clock())
    execution.status = SagaStatus.FINISHED  # pretend: then mark as compensating from "b"
    execution.phase = "compensate"
    execution.status = SagaStatus.COMPENSATING
    execution.error = {"step": "x", "error": "e"}
    created = await storage.create(execution.to_record())
    result = await manager.recover(created.id)
    assert result.status is SagaStatus.ERRORED and undone == ["b", "a"]


async def test_recover_paused_overdue_replays_then_compensates(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    clock = FakeClock()
    manager = quiet_manager(storage, pool, clock=clock)
    await manager.setup()
    saga = (
        Saga("overdue")
        .local_step(add("a", 1))
        .on_failure(add("undone", True))
        .remote_step(send("slow"), timeout=30, retry=RetryPolicy(max_attempts=2))
        .commit()
    )
    paused = await manager.run(saga, pause_on_disk=True)
    not_due = await manager.recover(paused.id)
    assert not_due.status is SagaStatus.PAUSED and len(pool.topic_messages("slow")) == 1
    clock.advance(31)
    replayed = await manager.recover(paused.id)
    assert replayed.status is SagaStatus.PAUSED and len(pool.topic_messages("slow")) == 2
    first, second = (SagaCommand.from_message(m) for m in pool.topic_messages("slow"))
    assert first.request_id == second.request_id and first.idempotency_key == second.idempotency_key
    clock.advance(31)
    compensated = await manager.recover(paused.id)
    assert compensated.status is SagaStatus.ERRORED and compensated.context.undone is True
    assert compensated.error is not None and compensated.error["type"] == "timeout"


async def test_retry_moves_dead_letter_back_for_recovery(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    manager = quiet_manager(storage, pool)
    await manager.setup()
    broken = {"on": True}

    def undo(ctx: SagaContext) -> None:
        if broken["on"]:
            raise OSError("ledger down")
        ctx.undone = True

    saga = (
        Saga("dl").local_step(add("a", 1)).on_failure(undo).local_step(lambda ctx: 1 / 0, name="x").commit()
    )
    dead = await manager.run(saga, raise_on_error=False)
    assert dead.status is SagaStatus.DEAD_LETTER
    await storage.increment_recovery_attempts(dead.id)
    with pytest.raises(SagaStateError, match="not dead_letter or failed"):
        await manager.retry((await manager.run(Saga("ok").local_step(add("a", 1)).commit())).id)
    record = await manager.retry(dead.id)
    assert record.status is SagaStatus.FAILED and record.recovery_attempts == 0
    broken["on"] = False
    recovered = await manager.recover(dead.id)
    assert recovered.status is SagaStatus.ERRORED and recovered.context.undone is True
    assert recovered.error is not None and recovered.error["step"] == "x"


async def test_recover_failed_run_that_was_waiting_resends_its_command(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    manager = quiet_manager(storage, pool)
    await manager.setup()

    def bad_reply(ctx: SagaContext, response: SagaResponse) -> SagaContext:
        ctx.things = [object()] if response.content == "bad" else ["fine"]
        return ctx

    saga = Saga("failed_wait").remote_step(send("x")).on_success(bad_reply).commit()
    paused = await manager.run(saga, pause_on_disk=True)
    assert paused.awaiting is not None
    with pytest.raises(Exception, match="things"):
        await manager.handle_reply(SagaResponse("bad", 200, paused.id, paused.awaiting.request_id, "svc"))
    stored = await storage.load(paused.id)
    assert stored.status is SagaStatus.FAILED and stored.owner is None
    recovered = await manager.recover(paused.id)
    assert recovered.status is SagaStatus.PAUSED and len(pool.topic_messages("x")) == 2
    assert recovered.awaiting is not None
    reply = SagaResponse("good", 200, paused.id, recovered.awaiting.request_id, "svc")
    assert await manager.handle_reply(reply) == "applied"
    assert (await manager.get(paused.id)).status is SagaStatus.FINISHED


async def test_destroy_releases_waiters_with_the_stored_execution(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    manager = SagaManager(storage, pool, relay_outbox=False, wait_poll_interval=5)
    await manager.setup()
    task = asyncio.create_task(manager.run(Saga("never").remote_step(send("void")).commit()))
    await eventually(lambda: len(pool.topic_messages("void")) == 1)
    await manager.destroy()
    execution = await task
    assert execution.status is SagaStatus.PAUSED


async def test_waiter_notices_progress_made_by_another_process(pool: InMemoryBrokerPool) -> None:
    storage = MemorySagaStorage()
    waiting = SagaManager(storage, pool, consume_replies=False, relay_outbox=False, wait_poll_interval=0.02)
    await waiting.setup()
    worker = SagaManager(storage, pool, relay_outbox=False, owner="worker", service_name="saga")
    saga = Saga("elsewhere").remote_step(send("far")).commit()
    waiting.register(saga)
    worker.register(saga)
    await worker.setup()
    try:
        async with FakeParticipant(pool, "far", ["far"]):
            execution = await asyncio.wait_for(waiting.run(saga), 5)
    finally:
        await worker.destroy()
    assert execution.status is SagaStatus.FINISHED


async def test_waiter_acts_on_an_overdue_reply(pool: InMemoryBrokerPool, storage: MemorySagaStorage) -> None:
    manager = SagaManager(storage, pool, relay_outbox=False, wait_poll_interval=0.02)
    await manager.setup()
    try:
        saga = (
            Saga("lost")
            .local_step(add("a", 1))
            .on_failure(add("undone", 1))
            .remote_step(send("void"), timeout=0.05)
            .commit()
        )
        execution = await asyncio.wait_for(manager.run(saga, raise_on_error=False), 5)
    finally:
        await manager.destroy()
    assert execution.status is SagaStatus.ERRORED and execution.context.undone == 1


async def test_duplicate_reply_race_is_reported_as_duplicate(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    manager = quiet_manager(storage, pool)
    await manager.setup()
    paused = await manager.run(Saga("race").remote_step(send("x")).commit(), pause_on_disk=True)
    assert paused.awaiting is not None
    response = SagaResponse(None, 200, paused.id, paused.awaiting.request_id, "svc")
    # Another worker applied this reply already (its dedup row exists) but our read predates it.
    await storage.record_reply(ReplyRecord(paused.id, paused.awaiting.request_id, 200, "applied"))
    assert await manager.handle_reply(response) == "duplicate"
    stored = await storage.load(paused.id)
    assert stored.status is SagaStatus.PAUSED and stored.owner is None
    [_, duplicate] = await storage.list_replies(paused.id)
    assert (duplicate.outcome, duplicate.reason) == ("duplicate", "applied by another worker")


async def test_recover_refuses_an_execution_this_process_is_driving(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    manager = quiet_manager(storage, pool)
    await manager.setup()
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(ctx: SagaContext) -> None:
        started.set()
        await release.wait()

    task = asyncio.create_task(manager.run(Saga("slow").local_step(slow).commit()))
    await started.wait()
    [record] = (await storage.query()).rows
    with pytest.raises(SagaBusyError, match="being advanced by this process"):
        await manager.recover(record.id)  # same owner: only the in-process check can tell
    release.set()
    assert (await task).status is SagaStatus.FINISHED
