"""SagaManager.run: durability, pause modes, replies, compensation, decisions (in-memory services)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest

from broker import InMemoryBrokerPool
from saga import (
    RetryPolicy,
    Saga,
    SagaContext,
    SagaContextError,
    SagaDefinitionError,
    SagaExecution,
    SagaExecutionError,
    SagaManager,
    SagaNotCommittedException,
    SagaRequest,
    SagaResponse,
    SagaStatus,
)
from saga.consumer import H_DEAD_LETTER_REASON
from saga.messages import SagaCommand, SagaControl
from storage.memory import MemorySagaStorage
from tests.unit.conftest import CountingStorage, FakeParticipant, add, eventually


def send(topic: str) -> Any:
    def build(ctx: SagaContext) -> SagaRequest:
        return SagaRequest(topic, {"order": ctx.get("order")})

    build.__name__ = f"send_{topic}"
    return build


def keep_reply(key: str) -> Any:
    def on_success(ctx: SagaContext, response: SagaResponse) -> SagaContext:
        ctx[key] = response.content
        return ctx

    return on_success


def controls(pool: InMemoryBrokerPool, service: str) -> list[tuple[str, uuid.UUID]]:
    return [
        (c.action, c.execution_id)
        for c in (SagaControl.from_message(m) for m in pool.topic_messages(f"{service}SagaControl"))
    ]


async def test_three_local_steps_cost_one_create_and_three_saves(pool: InMemoryBrokerPool) -> None:
    storage = CountingStorage(MemorySagaStorage())
    manager = SagaManager(storage, pool, consume_replies=False, relay_outbox=False)  # type: ignore[arg-type]
    await manager.setup()
    try:
        saga = Saga("three").local_step(add("a", 1)).local_step(add("b", 2)).local_step(add("c", 3)).commit()
        storage.calls.clear()
        execution = await manager.run(saga, {"order": 1})
        assert execution.status is SagaStatus.FINISHED
        assert dict(storage.calls) == {"create": 1, "save": 3}
        stored = await storage.inner.load(execution.id)
        assert stored.status is SagaStatus.FINISHED and stored.name == "three"
        assert [s.name for s in stored.steps] == ["add_a", "add_b", "add_c"]
        assert (await manager.get(execution.id)).context == {"order": 1, "a": 1, "b": 2, "c": 3}
    finally:
        await manager.destroy()


async def test_remote_steps_neither_fetch_the_outbox_nor_release(
    pool: InMemoryBrokerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Marks wait for company far longer than the run takes: the three publishes share one UPDATE,
    # written by destroy() at once instead of after the delay.
    monkeypatch.setattr("saga.driver.MARK_SENT_DELAY", 30.0)
    storage = CountingStorage(MemorySagaStorage())
    manager = SagaManager(storage, pool, service_name="orch", relay_outbox=False)  # type: ignore[arg-type]
    await manager.setup()
    try:
        saga = (
            Saga("lean")
            .remote_step(send("reserve"))
            .on_success(keep_reply("reserved"))
            .remote_step(send("charge"))
            .on_success(keep_reply("charged"))
            .commit()
        )
        async with FakeParticipant(pool, "stock", ["reserve", "charge"]):
            storage.calls.clear()
            execution = await manager.run(saga, {"order": 1})
        assert execution.status is SagaStatus.FINISHED
        # The create holds the first command (created PAUSED); then one save per reply, which applies it
        # and writes the next command (or the commit decision), with no claim before it (this manager
        # paused the run and holds its record). Every outbox write is published and marked sent by the
        # ids its create/save reported: no fetch_outbox, no release_claim.
        assert dict(storage.calls) == {"create": 1, "save": 2}
        stored = await storage.inner.load(execution.id)
        assert stored.owner is None and stored.lease_until is None
        assert controls(pool, "stock") == [("commit", execution.id)]
    finally:
        started = asyncio.get_running_loop().time()
        await manager.destroy()
    assert asyncio.get_running_loop().time() - started < 10  # did not sit out the delay
    assert storage.calls["mark_outbox_sent"] == 1
    assert await storage.inner.fetch_outbox(lease_seconds=-1) == []


class _SaveWithoutOutboxClaim(MemorySagaStorage):
    """A storage written before ``outbox_claim`` existed (its ``save`` does not take it)."""

    async def save(self, record: Any, *, outbox: Any = (), reply: Any = None) -> Any:  # type: ignore[override]
        return await super().save(record, outbox=outbox, reply=reply)


async def test_a_storage_without_outbox_claim_still_publishes(
    pool: InMemoryBrokerPool,
) -> None:
    storage = _SaveWithoutOutboxClaim()
    manager = SagaManager(storage, pool, service_name="orch", relay_outbox=False)  # type: ignore[arg-type]
    await manager.setup()
    try:
        saga = Saga("old").remote_step(send("reserve")).on_success(keep_reply("r")).commit()
        async with FakeParticipant(pool, "stock", ["reserve"]):
            execution = await manager.run(saga, {"order": 1})
        assert execution.status is SagaStatus.FINISHED
        assert await storage.fetch_outbox(lease_seconds=-1) == []
        assert [m.value for m in pool.topic_messages("reserve")] and controls(pool, "stock")
    finally:
        await manager.destroy()


async def test_remote_happy_path_waits_in_memory_and_commits_once_per_service(
    manager: SagaManager, pool: InMemoryBrokerPool
) -> None:
    saga = (
        Saga("order")
        .remote_step(send("reserve"))
        .on_success(keep_reply("reserved"))
        .remote_step(send("charge"))
        .on_success(keep_reply("charged"))
        .local_step(add("done", True))
        .commit()
    )
    async with FakeParticipant(pool, "stock", ["reserve", "charge"]) as stock:
        execution = await manager.run(saga, {"order": 42}, user="alice")
    assert execution.status is SagaStatus.FINISHED
    assert execution.context == {
        "order": 42,
        "reserved": {"order": 42},
        "charged": {"order": 42},
        "done": True,
    }
    assert [c.target for c in stock.commands] == ["reserve", "charge"]
    assert all(c.user == "alice" and c.reply_topic == "orchReply" for c in stock.commands)
    assert controls(pool, "stock") == [("commit", execution.id)]  # two steps, one service, one commit
    replies = await manager.storage.list_replies(execution.id)
    assert [r.outcome for r in replies] == ["applied", "applied"]


async def test_pause_on_disk_returns_paused_and_the_reply_finishes_it(
    manager: SagaManager, pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    saga = Saga("paused").remote_step(send("reserve")).on_success(keep_reply("r")).commit()
    execution = await manager.run(saga, {"order": 1}, pause_on_disk=True)
    assert execution.status is SagaStatus.PAUSED
    stored = await storage.load(execution.id)
    assert stored.status is SagaStatus.PAUSED and stored.owner is None  # the claim is released
    [command] = pool.topic_messages("reserve")
    assert command.key == str(execution.id).encode()
    async with FakeParticipant(pool, "stock", ["reserve"]):
        await eventually(lambda: _status(storage, execution.id, SagaStatus.FINISHED))
    assert (await manager.get(execution.id)).context.r == {"order": 1}


async def _status(storage: MemorySagaStorage, execution_id: uuid.UUID, status: SagaStatus) -> bool:
    return (await storage.load(execution_id)).status is status


async def test_run_with_response_resumes_like_minos(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    manager = SagaManager(storage, pool, consume_replies=False, relay_outbox=False)
    await manager.setup()
    try:
        saga = (
            Saga("resume")
            .remote_step(send("reserve"))
            .on_success(keep_reply("r"))
            .local_step(add("x", 1))
            .commit()
        )
        paused = await manager.run(saga, pause_on_disk=True)
        assert paused.awaiting is not None
        response = SagaResponse({"ok": True}, 200, paused.id, paused.awaiting.request_id, "stock")
        finished = await manager.run(response=response)
        assert finished.status is SagaStatus.FINISHED and finished.context == {"r": {"ok": True}, "x": 1}
        again = await manager.run(response=response, pause_on_disk=True)  # duplicate: nothing changes
        assert again.status is SagaStatus.FINISHED
        assert [r.outcome for r in await storage.list_replies(paused.id)] == ["applied", "duplicate"]
    finally:
        await manager.destroy()


async def test_400_without_on_error_compensates_and_rejects(
    manager: SagaManager, pool: InMemoryBrokerPool
) -> None:
    undone: list[str] = []
    saga = (
        Saga("refused")
        .remote_step(send("reserve"))
        .on_failure(lambda ctx: undone.append("reserve") or SagaRequest("release", {}))
        .remote_step(send("charge"))
        .commit()
    )

    def handler(command: Any) -> tuple[int, Any]:
        return (400, {"reason": "declined"}) if command.target == "charge" else (200, None)

    async with FakeParticipant(pool, "shop", ["reserve", "charge", "release"], handler) as shop:
        with pytest.raises(SagaExecutionError, match="ended errored") as info:
            await manager.run(saga)
    error = info.value
    assert error.status == "errored" and error.step == "send_charge" and error.execution_id is not None
    assert (
        error.error is not None
        and error.error["status"] == 400
        and error.error["reply"] == {"reason": "declined"}
    )
    assert [c.target for c in shop.commands] == ["reserve", "charge", "release"]
    assert undone == ["reserve"]
    assert controls(pool, "shop") == [("reject", error.execution_id)]


async def test_400_with_on_error_continues(manager: SagaManager, pool: InMemoryBrokerPool) -> None:
    def handled(ctx: SagaContext, response: SagaResponse) -> SagaContext:
        ctx.declined = True
        return ctx

    saga = Saga("handled").remote_step(send("charge")).on_error(handled).local_step(add("after", 1)).commit()
    async with FakeParticipant(pool, "pay", ["charge"], lambda c: (400, "no")):
        execution = await manager.run(saga)
    assert execution.status is SagaStatus.FINISHED and execution.context == {"declined": True, "after": 1}


async def test_500_compensates_and_raise_on_error_false_returns_the_execution(
    manager: SagaManager, pool: InMemoryBrokerPool
) -> None:
    saga = (
        Saga("crashy")
        .local_step(add("a", 1))
        .on_failure(add("undone", True))
        .remote_step(send("pay"))
        .commit()
    )
    async with FakeParticipant(pool, "pay", ["pay"], lambda c: (500, "boom")):
        execution = await manager.run(saga, raise_on_error=False)
        assert execution.status is SagaStatus.ERRORED and execution.context.undone is True
        execution_id = await manager.run(saga, raise_on_error=False, return_execution=False)
    assert isinstance(execution_id, uuid.UUID)
    assert (await manager.get(execution_id)).status is SagaStatus.ERRORED


async def test_unknown_status_goes_to_dead_letter_and_the_step_keeps_waiting(
    manager: SagaManager, pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    saga = Saga("odd").remote_step(send("reserve")).commit()
    async with FakeParticipant(pool, "stock", ["reserve"], lambda c: (302, {"moved": True})):
        execution = await manager.run(saga, pause_on_disk=True)
        await eventually(lambda: len(pool.topic_messages("orchDeadLetter")) == 1)
    [dead] = pool.topic_messages("orchDeadLetter")
    assert dead.headers[H_DEAD_LETTER_REASON] == "unknown_status: status 302"
    assert orjson.loads(dead.value) == {"moved": True}
    stored = await storage.load(execution.id)
    assert stored.status is SagaStatus.PAUSED
    assert [(r.outcome, r.status) for r in await storage.list_replies(execution.id)] == [
        ("unknown_status", 302)
    ]
    assert manager.consumer is not None and manager.consumer.stats["unknown_status"] == 1


async def test_duplicate_and_stale_replies_are_recorded_and_change_nothing(
    manager: SagaManager, pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    saga = (
        Saga("dup").remote_step(send("one")).on_success(keep_reply("one")).remote_step(send("two")).commit()
    )
    first = await manager.run(saga, pause_on_disk=True)
    assert first.awaiting is not None
    first_request = first.awaiting.request_id
    reply_one = SagaResponse("first", 200, first.id, first_request, "svc")
    assert await manager.handle_reply(reply_one) == "applied"
    before = await storage.load(first.id)
    assert before.status is SagaStatus.PAUSED  # now waiting for step two
    # The same reply again, and one for a request this execution never awaits.
    assert await manager.handle_reply(reply_one) == "duplicate"
    stranger = SagaResponse("x", 200, first.id, uuid.uuid4(), "svc")
    assert await manager.handle_reply(stranger) == "stale"
    after = await storage.load(first.id)
    assert after.state == before.state and after.steps == before.steps and after.status is before.status
    assert after.owner is None
    outcomes = [r.outcome for r in await storage.list_replies(first.id)]
    assert outcomes == ["applied", "duplicate", "stale"]
    assert (await manager.get(first.id)).context.one == "first"


async def test_compensation_runs_in_reverse_order(manager: SagaManager, pool: InMemoryBrokerPool) -> None:
    order: list[str] = []

    def undo(name: str) -> Any:
        def compensation(ctx: SagaContext) -> None:
            order.append(name)

        return compensation

    def boom(ctx: SagaContext) -> None:
        raise RuntimeError("out of stock")

    saga = (
        Saga("reverse")
        .local_step(add("a", 1))
        .on_failure(undo("a"))
        .remote_step(send("b"))
        .on_failure(lambda ctx: order.append("b") or SagaRequest("undo_b", {}))
        .local_step(add("c", 1))
        .on_failure(undo("c"))
        .local_step(boom)
        .commit()
    )
    async with FakeParticipant(pool, "svc", ["b", "undo_b"]):
        execution = await manager.run(saga, raise_on_error=False)
    assert execution.status is SagaStatus.ERRORED
    assert order == ["c", "b", "a"]
    assert execution.error == {"step": "boom", "error": "out of stock", "type": "RuntimeError"}


async def test_failing_compensation_dead_letters(manager: SagaManager) -> None:
    def bad(ctx: SagaContext) -> None:
        raise OSError("ledger unavailable")

    saga = (
        Saga("dl", compensation_retry=RetryPolicy(max_attempts=2, initial_delay=0.001))
        .local_step(add("a", 1))
        .on_failure(bad)
        .local_step(lambda ctx: 1 / 0, name="explode")
        .commit()
    )
    with pytest.raises(SagaExecutionError) as info:
        await manager.run(saga)
    assert info.value.status == "dead_letter" and info.value.step == "add_a"
    assert info.value.error is not None
    assert info.value.error["compensation_error"] == "ledger unavailable"
    assert info.value.error["failed_step"] == "explode"
    assert info.value.error["error"] == "division by zero"


async def test_local_retry_with_backoff_then_success_then_exhausted(manager: SagaManager) -> None:
    attempts: list[float] = []

    def flaky(ctx: SagaContext) -> None:
        attempts.append(asyncio.get_running_loop().time())
        if len(attempts) < 3:
            raise ConnectionError("try again")

    policy = RetryPolicy(max_attempts=3, initial_delay=0.02, backoff=2)
    saga = Saga("flaky").local_step(flaky, retry=policy).commit()
    execution = await manager.run(saga)
    assert execution.status is SagaStatus.FINISHED and execution.steps[0].attempts == 3
    assert attempts[1] - attempts[0] >= 0.015 and attempts[2] - attempts[1] >= 0.035

    undone: list[int] = []

    def never(ctx: SagaContext) -> None:
        raise ConnectionError("down")

    saga2 = (
        Saga("exhausted")
        .local_step(add("a", 1))
        .on_failure(lambda ctx: undone.append(1))
        .local_step(never, retry=RetryPolicy(max_attempts=2, initial_delay=0.001))
        .commit()
    )
    failed = await manager.run(saga2, raise_on_error=False)
    assert failed.status is SagaStatus.ERRORED and undone == [1]
    assert [(s.name, s.status, s.attempts) for s in failed.steps][1] == ("never", "failed", 2)


async def test_conditional_branches_through_the_manager(manager: SagaManager) -> None:
    saga = (
        Saga("cond")
        .conditional_step(name="pick")
        .if_then(lambda ctx: ctx.kind == "a", Saga().local_step(add("a", 1), name="branch_a").commit())
        .else_then(Saga().local_step(add("b", 1), name="branch_b").commit())
        .commit()
    )
    assert (await manager.run(saga, {"kind": "a"})).context == {"kind": "a", "a": 1}
    assert (await manager.run(saga, {"kind": "z"})).context == {"kind": "z", "b": 1}


async def test_unstorable_context_marks_failed_and_names_key_and_step(
    manager: SagaManager, storage: MemorySagaStorage
) -> None:
    def store_set(ctx: SagaContext) -> None:
        ctx.things = []
        ctx.things.append({1, 2})

    saga = Saga("bad").local_step(add("a", 1)).local_step(store_set).commit()
    with pytest.raises(SagaContextError) as info:
        await manager.run(saga)
    assert info.value.key == "things" and info.value.step == "store_set"
    assert info.value.execution_id is not None
    stored = await storage.load(info.value.execution_id)
    assert stored.status is SagaStatus.FAILED and stored.error is not None
    assert stored.error["step"] == "store_set" and stored.error["type"] == "SagaContextError"
    assert [s.name for s in stored.steps] == ["add_a"]  # the last good state
    assert stored.owner is None  # released for recovery
    with pytest.raises(SagaContextError, match="'bad'"):
        await manager.run(saga, {"bad": object()})


async def test_a_first_remote_step_is_created_paused_with_its_command(pool: InMemoryBrokerPool) -> None:
    storage = CountingStorage(MemorySagaStorage())
    manager = SagaManager(storage, pool, consume_replies=False, relay_outbox=False)  # type: ignore[arg-type]
    await manager.setup()
    try:
        saga = Saga("first").remote_step(send("reserve")).commit()
        storage.calls.clear()
        execution = await manager.run(saga, {"order": 1}, pause_on_disk=True)
        assert isinstance(execution, SagaExecution) and execution.awaiting is not None
        assert dict(storage.calls) == {"create": 1}  # no save: the create holds the command
        stored = await storage.inner.load(execution.id)
        assert stored.status is SagaStatus.PAUSED and stored.version == 1 and stored.owner is None
        assert [(s.name, s.status) for s in stored.steps] == [("send_reserve", "waiting")]
        [command] = pool.topic_messages("reserve")
        assert SagaCommand.from_message(command).request_id == execution.awaiting.request_id
    finally:
        await manager.destroy()


async def test_a_first_command_that_cannot_be_built_is_stored_compensated(
    manager: SagaManager, storage: MemorySagaStorage, pool: InMemoryBrokerPool
) -> None:
    def reserve(ctx: SagaContext) -> SagaRequest:
        raise ValueError("no stock service configured")

    saga = Saga("broken").remote_step(reserve).commit()
    execution = await manager.run(saga, raise_on_error=False)
    assert isinstance(execution, SagaExecution) and execution.status is SagaStatus.ERRORED
    stored = await storage.load(execution.id)
    assert stored.status is SagaStatus.ERRORED and stored.error is not None
    assert stored.error["step"] == "reserve" and "no stock service" in stored.error["error"]
    assert [(s.name, s.status) for s in stored.steps] == [("reserve", "failed")]
    assert pool.topic_messages("reserve") == []


async def test_a_first_command_leaving_an_unstorable_context_is_stored_failed(
    manager: SagaManager, storage: MemorySagaStorage, pool: InMemoryBrokerPool
) -> None:
    def reserve(ctx: SagaContext) -> SagaRequest:
        ctx.things = [{1, 2}]
        return SagaRequest("reserve", {})

    saga = Saga("unstorable").remote_step(reserve).commit()
    with pytest.raises(SagaContextError) as info:
        await manager.run(saga)
    assert info.value.key == "things" and info.value.step == "reserve"
    assert info.value.execution_id is not None
    stored = await storage.load(info.value.execution_id)
    assert stored.status is SagaStatus.FAILED and stored.steps == ()  # the last good state: the start
    assert pool.topic_messages("reserve") == []


async def test_idempotency_key_returns_the_first_execution(
    manager: SagaManager, storage: MemorySagaStorage
) -> None:
    calls: list[int] = []

    def once(ctx: SagaContext) -> None:
        calls.append(1)

    saga = Saga("idem").local_step(once).commit()
    first = await manager.run(saga, idempotency_key="order-1")
    second = await manager.run(saga, idempotency_key="order-1")
    assert first.id == second.id and calls == [1]
    assert (await storage.query()).total == 1
    assert (await manager.run(saga, idempotency_key="order-2")).id != first.id


async def test_idempotency_key_race_on_create_returns_the_winner(
    manager: SagaManager, storage: MemorySagaStorage
) -> None:
    saga = Saga("race").local_step(add("a", 1)).commit()
    first = await manager.run(saga, idempotency_key="k")
    original = storage.find_by_idempotency_key

    async def miss(key: str) -> None:  # the lookup races with another starter
        return None

    storage.find_by_idempotency_key = miss  # type: ignore[method-assign]
    try:
        second = await manager.run(saga, idempotency_key="k")
    finally:
        storage.find_by_idempotency_key = original  # type: ignore[method-assign]
    assert second.id == first.id


async def test_run_needs_a_definition_or_a_response(manager: SagaManager) -> None:
    with pytest.raises(Exception, match="needs a definition"):
        await manager.run()


async def test_nameless_minos_saga_is_registered_on_the_fly(manager: SagaManager) -> None:
    saga = Saga()
    saga.local_step(add("a", 1))
    saga.commit()
    execution = await manager.run(saga)
    assert saga.name is not None and execution.name == saga.name
    assert isinstance(execution, SagaExecution)


async def test_a_saga_left_without_commit_is_refused_before_anything_runs(manager: SagaManager) -> None:
    ran: list[str] = []
    statements = Saga("statements")
    statements.local_step(lambda context: ran.append("step"))
    with pytest.raises(SagaNotCommittedException, match=r"'statements' is not committed: call \.commit\(\)"):
        await manager.run(statements)
    chained = Saga("chained").local_step(lambda context: ran.append("step"))
    with pytest.raises(
        SagaDefinitionError,
        match=r"a LocalSagaStep \(step 'local_step_1' of saga 'chained'\), not a Saga: end the chain with "
        r"\.commit\(\)",
    ):
        await manager.run(chained)  # type: ignore[arg-type]
    assert ran == [] and len(manager.registry) == 0


async def test_a_reply_costs_one_save_with_the_step_that_follows(pool: InMemoryBrokerPool) -> None:
    storage = CountingStorage(MemorySagaStorage())
    manager = SagaManager(storage, pool, relay_outbox=False, service_name="orch")  # type: ignore[arg-type]
    await manager.setup()
    try:
        saga = Saga("r3").remote_step(send("a")).remote_step(send("b")).remote_step(send("c")).commit()
        async with FakeParticipant(pool, "svc", ["a", "b", "c"]):
            storage.calls.clear()
            execution = await manager.run(saga)
        assert execution.status is SagaStatus.FINISHED
        # create PAUSED(a) with its command; then one save per reply: applied a + PAUSED(b), b + PAUSED(c),
        # c + end; no claims: this manager paused the run each time (test_saga_manager_unclaimed.py).
        assert storage.calls["create"] == 1 and storage.calls["save"] == 3 and storage.calls["claim"] == 0
        replies = await storage.inner.list_replies(execution.id)
        assert [r.outcome for r in replies] == ["applied"] * 3
    finally:
        await manager.destroy()


async def test_a_step_failing_after_a_reply_keeps_what_the_reply_stored(
    manager: SagaManager, pool: InMemoryBrokerPool
) -> None:
    refunds: list[Any] = []

    def refund(ctx: SagaContext) -> SagaRequest:
        refunds.append(ctx["charge"])  # stored by on_success, in the same transaction as the failure
        return SagaRequest("refund", ctx["charge"])

    def confirm(ctx: SagaContext) -> None:
        raise RuntimeError("cannot confirm")

    saga = (
        Saga("charge_then_fail")
        .remote_step(send("charge"))
        .on_success(keep_reply("charge"))
        .on_failure(refund)
        .local_step(confirm)
        .commit()
    )
    async with FakeParticipant(pool, "pay", ["charge", "refund"], lambda c: (200, {"id": "ch-1"})):
        execution = await manager.run(saga, raise_on_error=False)
    assert execution.status is SagaStatus.ERRORED
    assert refunds == [{"id": "ch-1"}]
    assert execution.context["charge"] == {"id": "ch-1"}
