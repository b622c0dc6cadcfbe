"""`SagaParticipant` with a participant store (SQLite file), over the in-memory broker.

The handler's writes, the dedup record and the reply commit together; claims keep a second instance from
running a command twice; a compensation that comes first leaves a tombstone.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from broker import BrokerMessage, InMemoryBrokerPool
from saga import SagaBusinessError, SagaResponse, SagaResponseStatus, SagaStateError
from saga.messages import H_PROTOCOL_VERSION, H_TRACEPARENT, H_TRACESTATE, SagaCommand
from saga.participant import H_DEAD_LETTER_REASON, CommandContext, SagaParticipant
from storage.participant import SqlParticipantStore

REPLY = "orderReply"
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

app_metadata = MetaData()
#: The participant's own table, without unique constraints so a doubled effect shows as two rows.
moves = Table(
    "stock_moves",
    app_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("execution_id", String(64)),
    Column("delta", Integer),
)


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    text: Mapped[str] = mapped_column(String(100))


def command(
    target: str = "ReserveStock",
    content: Any = None,
    *,
    execution_id: uuid.UUID | None = None,
    key: str | None = None,
    step: str = "reserve",
) -> SagaCommand:
    return SagaCommand(
        target=target,
        content={"quantity": 1} if content is None else content,
        execution_id=execution_id or uuid.uuid4(),
        request_id=uuid.uuid4(),
        reply_topic=REPLY,
        idempotency_key=key or str(uuid.uuid4()),
        user="alice",
        saga="order",
        step=step,
        traceparent=TRACE,
    )


async def wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 (polling state, not an event)
            await asyncio.sleep(0.005)


def replies(pool: InMemoryBrokerPool) -> list[SagaResponse]:
    return [SagaResponse.from_message(m) for m in pool.topic_messages(REPLY)]


@pytest.fixture
async def pool() -> AsyncIterator[InMemoryBrokerPool]:
    async with InMemoryBrokerPool(partitions=2) as pool:
        yield pool


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlParticipantStore]:
    store = SqlParticipantStore(f"sqlite+aiosqlite:///{tmp_path}/inventory.db")
    await store.start()
    async with store.engine.begin() as conn:
        await conn.run_sync(app_metadata.create_all)
        await conn.run_sync(Base.metadata.create_all)
    try:
        yield store
    finally:
        await store.stop()


async def effects(store: SqlParticipantStore, execution_id: uuid.UUID | None = None) -> list[int]:
    async with store.engine.connect() as conn:
        query = select(moves.c.delta).order_by(moves.c.id)
        if execution_id is not None:
            query = query.where(moves.c.execution_id == str(execution_id))
        return list((await conn.execute(query)).scalars())


def inventory(
    pool: InMemoryBrokerPool,
    store: SqlParticipantStore,
    *,
    gate: asyncio.Event | None = None,
    started: asyncio.Event | None = None,
    **kw: Any,
) -> SagaParticipant:
    participant = SagaParticipant("inventory", pool, store=store, **kw)
    participant.calls = []  # type: ignore[attr-defined]

    @participant.command("ReserveStock")
    async def reserve(request: CommandContext) -> dict[str, Any]:
        participant.calls.append(("reserve", request.idempotency_key))  # type: ignore[attr-defined]
        await request.connection.execute(
            insert(moves).values(execution_id=str(request.execution_id), delta=request.content["quantity"])
        )
        if started is not None:
            started.set()
        if gate is not None:
            await gate.wait()
        quantity = request.content["quantity"]
        if quantity > 10:
            raise SagaBusinessError("not enough stock")
        if request.content.get("crash"):
            raise RuntimeError("disk on fire")
        return {"reserved": quantity, "padding": "x" * request.content.get("pad", 0)}

    @participant.command("ReleaseStock", compensates="ReserveStock")
    async def release(request: CommandContext) -> str:
        participant.calls.append(("release", request.idempotency_key))  # type: ignore[attr-defined]
        await request.connection.execute(
            insert(moves).values(execution_id=str(request.execution_id), delta=-request.content["quantity"])
        )
        return "released"

    return participant


async def test_the_effect_and_the_reply_commit_together_and_a_duplicate_is_answered_from_them(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    participant = inventory(pool, store)
    cmd = command()
    async with participant:
        await pool.publisher().send(cmd.to_message())
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 1)
        await pool.publisher().send(cmd.to_message())
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 2)
    first, second = replies(pool)
    assert first.status is second.status is SagaResponseStatus.SUCCESS
    assert first.content == second.content == {"reserved": 1, "padding": ""}
    assert await effects(store) == [1]
    assert len(participant.calls) == 1  # type: ignore[attr-defined]
    assert participant.stats.duplicates == 1


async def test_replies_carry_the_protocol_version_and_the_commands_trace_context(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    participant = inventory(pool, store)
    message = command().to_message()
    message = BrokerMessage(
        topic=message.topic,
        key=message.key,
        value=message.value,
        headers={**message.headers, H_TRACESTATE: "vendor=1"},
    )
    async with participant:
        await pool.publisher().send(message)
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 1)
    [reply] = pool.topic_messages(REPLY)
    assert reply.headers[H_PROTOCOL_VERSION] == "1"
    assert reply.headers[H_TRACEPARENT] == TRACE
    assert reply.headers[H_TRACESTATE] == "vendor=1"


@pytest.mark.parametrize(
    ("content", "status"),
    [
        ({"quantity": 11}, SagaResponseStatus.ERROR),
        ({"quantity": 1, "crash": True}, SagaResponseStatus.SYSTEM_ERROR),
    ],
)
async def test_a_refusing_or_failing_handler_leaves_no_effect(
    pool: InMemoryBrokerPool, store: SqlParticipantStore, content: dict[str, Any], status: SagaResponseStatus
) -> None:
    participant = inventory(pool, store)
    cmd = command(content=content)
    async with participant:
        await pool.publisher().send(cmd.to_message())
        await pool.publisher().send(cmd.to_message())
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 2)
    assert [r.status for r in replies(pool)] == [status, status]
    assert await effects(store) == []
    assert len(participant.calls) == 1  # type: ignore[attr-defined]


async def test_a_compensation_before_its_forward_leaves_a_tombstone_that_refuses_it(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    participant = inventory(pool, store)
    execution = uuid.uuid4()
    compensation = command("ReleaseStock", execution_id=execution)
    forward = command("ReserveStock", execution_id=execution)
    async with participant:
        await pool.publisher().send(compensation.to_message())
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 1)
        await pool.publisher().send(forward.to_message())
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 2)
    undone, refused = replies(pool)
    assert undone.status is SagaResponseStatus.SUCCESS
    assert undone.request_id == compensation.request_id
    assert refused.status is SagaResponseStatus.ERROR
    assert refused.content["error"] == "cancelled"
    assert participant.calls == []  # type: ignore[attr-defined]
    assert await effects(store) == []
    assert (participant.stats.tombstones, participant.stats.cancelled) == (1, 1)


async def test_a_compensation_after_its_forward_undoes_it_and_refuses_a_late_retry(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    participant = inventory(pool, store)
    execution = uuid.uuid4()
    async with participant:
        for cmd in (
            command("ReserveStock", execution_id=execution),
            command("ReleaseStock", execution_id=execution),
            command("ReserveStock", execution_id=execution),  # a retry of the step published late
        ):
            sent = len(pool.topic_messages(REPLY))
            await pool.publisher().send(cmd.to_message())
            await wait_for(lambda n=sent: len(pool.topic_messages(REPLY)) == n + 1)  # type: ignore[misc]
    assert [r.status for r in replies(pool)] == [200, 200, 400]
    assert await effects(store, execution) == [1, -1]


async def test_a_compensation_of_a_forward_that_failed_has_nothing_to_undo(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    participant = inventory(pool, store)
    execution = uuid.uuid4()
    async with participant:
        await pool.publisher().send(
            command("ReserveStock", {"quantity": 1, "crash": True}, execution_id=execution).to_message()
        )
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 1)
        await pool.publisher().send(command("ReleaseStock", execution_id=execution).to_message())
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 2)
    assert [r.status for r in replies(pool)] == [500, 200]
    assert await effects(store) == []
    assert [name for name, _ in participant.calls] == ["reserve"]  # type: ignore[attr-defined]


async def test_a_second_instance_never_runs_a_command_the_first_is_running(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    # Both instances share the SQLite store (one writer at a time): the second one's claim waits for the
    # first one's transaction and then finds the command done. PostgreSQL's waiting on a live lease is
    # covered by the integration suite.
    gate, started = asyncio.Event(), asyncio.Event()
    a = inventory(pool, store, gate=gate, started=started, instance_id="a")
    b = inventory(pool, store, instance_id="b", lease_seconds=5)
    cmd = command()
    async with a, b:
        handling = asyncio.create_task(a.handle(cmd.to_message()))
        await started.wait()
        duplicate = asyncio.create_task(b.handle(cmd.to_message()))
        await asyncio.sleep(0.1)
        assert not duplicate.done()
        gate.set()
        await asyncio.gather(handling, duplicate)
    assert [r.status for r in replies(pool)] == [200, 200]
    assert len(a.calls) == 1 and b.calls == []  # type: ignore[attr-defined]
    assert b.stats.duplicates == 1
    assert await effects(store) == [1]


async def test_a_claim_whose_owner_died_is_taken_over_after_its_lease(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    participant = inventory(pool, store, lease_seconds=5)
    cmd = command()
    claim = await store.claim("inventory", cmd.idempotency_key, owner="dead", lease=0.2, kind="plain")
    assert claim.outcome == "claimed"
    async with participant:
        await participant.handle(cmd.to_message())
    assert [r.status for r in replies(pool)] == [200]
    assert participant.stats.waited == 1
    assert await effects(store) == [1]


async def test_an_oversized_reply_becomes_a_small_500_and_its_effect_is_rolled_back(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    participant = inventory(pool, store, max_reply_bytes=10_000)
    async with participant:
        await pool.publisher().send(command(content={"quantity": 1, "pad": 20_000}).to_message())
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 1)
    [reply] = replies(pool)
    assert reply.status is SagaResponseStatus.SYSTEM_ERROR
    assert reply.content["reason"] == "reply_too_large"
    assert reply.content["limit"] == 10_000
    assert reply.content["size"] > 20_000
    assert await effects(store) == []
    assert participant.stats.oversized_replies == 1


async def test_a_newer_protocol_version_is_dead_lettered_without_running_the_handler(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    participant = inventory(pool, store)
    message = command().to_message()
    newer = BrokerMessage(
        topic=message.topic,
        key=message.key,
        value=message.value,
        headers={**message.headers, H_PROTOCOL_VERSION: "2"},
    )
    async with participant:
        await pool.publisher().send(newer)
        await wait_for(lambda: len(pool.topic_messages("inventoryDeadLetter")) == 1)
    [letter] = pool.topic_messages("inventoryDeadLetter")
    assert letter.headers[H_DEAD_LETTER_REASON].startswith("unsupported_protocol")
    assert participant.stats.dead_letter_reasons == {"unsupported_protocol": 1}
    assert participant.calls == []  # type: ignore[attr-defined]


async def test_a_handler_may_write_through_an_orm_session_in_the_same_transaction(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    participant = SagaParticipant("notes", pool, store=store)

    @participant.command("Note")
    async def note(request: CommandContext) -> int:
        request.session.add(Note(text=request.content["text"]))
        return 1

    cmd = command("Note", {"text": "hello"})
    async with participant:
        await pool.publisher().send(cmd.to_message())
        await pool.publisher().send(cmd.to_message())
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 2)
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(Note))).scalar_one() == 1


async def test_an_at_least_once_handler_gets_the_idempotency_key_and_no_transaction(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    participant = SagaParticipant("payments", pool, store=store)
    seen: list[str] = []

    @participant.command("Charge", transactional=False)
    async def charge(request: CommandContext) -> str:
        seen.append(request.idempotency_key)
        with pytest.raises(SagaStateError):
            request.connection  # noqa: B018
        return "charged"

    cmd = command("Charge")
    async with participant:
        await pool.publisher().send(cmd.to_message())
        await pool.publisher().send(cmd.to_message())
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 2)
    assert seen == [cmd.idempotency_key]


async def test_an_at_least_once_compensation_waits_for_its_running_forward(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    participant = SagaParticipant("payments", pool, store=store)
    gate = asyncio.Event()
    order: list[str] = []

    @participant.command("Charge", transactional=False)
    async def charge(request: CommandContext) -> str:
        order.append("charge started")
        await gate.wait()
        order.append("charge done")
        return "charged"

    @participant.command("Refund", compensates="Charge", transactional=False)
    async def refund(request: CommandContext) -> str:
        order.append("refund")
        return "refunded"

    execution = uuid.uuid4()
    async with participant:
        forward = asyncio.create_task(
            participant.handle(command("Charge", execution_id=execution).to_message())
        )
        await wait_for(lambda: order == ["charge started"])
        compensation = asyncio.create_task(
            participant.handle(command("Refund", execution_id=execution).to_message())
        )
        await asyncio.sleep(0.2)
        assert not compensation.done()
        gate.set()
        await asyncio.gather(forward, compensation)
    assert order == ["charge started", "charge done", "refund"]


async def test_compensates_needs_a_store(pool: InMemoryBrokerPool) -> None:
    participant = SagaParticipant("inventory", pool)

    @participant.command("Release", compensates="Reserve")
    def release(request: CommandContext) -> None:
        return None

    with pytest.raises(SagaStateError, match="needs a store"):
        await participant.start()


def test_compensates_must_name_another_topic(pool: InMemoryBrokerPool) -> None:
    participant = SagaParticipant("inventory", pool)
    with pytest.raises(ValueError, match="compensates"):
        participant.command("Release", compensates="Release")


async def test_a_store_and_a_dedup_storage_are_exclusive(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    from storage import MemorySagaStorage

    with pytest.raises(ValueError, match="not both"):
        SagaParticipant("inventory", pool, store=store, storage=MemorySagaStorage())


async def test_committed_replies_left_unpublished_are_relayed(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    await store.claim("inventory", "k1", owner="dead", lease=30)
    async with store.transaction() as conn:
        await store.complete(
            conn,
            "inventory",
            "k1",
            owner="dead",
            status=200,
            value=b'"ok"',
            reply_topic=REPLY,
            reply_key=b"x",
            reply_headers={"saga-kind": "reply"},
        )
        await conn.execute(text("UPDATE saga_participant_outbox SET created_at = created_at - 60"))
    participant = inventory(pool, store)
    async with participant:
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 1)
    [message] = pool.topic_messages(REPLY)
    assert message.value == b'"ok"'


async def test_a_handler_whose_statement_fails_leaves_the_next_command_working(
    pool: InMemoryBrokerPool, store: SqlParticipantStore
) -> None:
    participant = SagaParticipant("notes", pool, store=store)

    @participant.command("Note")
    async def note(request: CommandContext) -> int:
        if request.content.get("bad"):
            await request.connection.execute(text("INSERT INTO no_such_table VALUES (1)"))
        request.session.add(Note(text=request.content["text"]))
        return 1

    async with participant:
        await participant.handle(command("Note", {"text": "a", "bad": True}).to_message())
        await participant.handle(command("Note", {"text": "b"}).to_message())
    assert sorted(r.status for r in replies(pool)) == [200, 500]  # two executions: two partitions
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(Note.text))).scalars().all() == ["b"]
