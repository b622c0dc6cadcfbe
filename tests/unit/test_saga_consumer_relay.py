"""ReplyConsumer (bad input never stops it; offsets follow the state) and OutboxRelay (the safety net)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from broker import BrokerConnectionError, BrokerMessage, InMemoryBrokerPool
from broker.memory import partition_for_key
from saga import (
    Saga,
    SagaBusyError,
    SagaContext,
    SagaManager,
    SagaRecoveryWorker,
    SagaRequest,
    SagaResponse,
    SagaStatus,
)
from saga.consumer import H_DEAD_LETTER_REASON, ReplyConsumer
from saga.messages import H_EXECUTION_ID, H_KIND, H_REQUEST_ID, H_STATUS, SagaCommand
from saga.relay import OutboxRelay
from storage import ExecutionRecord, OutboxMessage, StorageUnavailableError
from storage.memory import MemorySagaStorage
from storage.records import ReplyOutcome
from tests.unit.conftest import FakeParticipant, eventually


def send(topic: str) -> Any:
    def build(ctx: SagaContext) -> SagaRequest:
        return SagaRequest(topic, {})

    build.__name__ = f"send_{topic}"
    return build


class FlakyPublisher:
    """Publisher that raises the queued failures first."""

    def __init__(self, inner: Any, failures: list[Exception]) -> None:
        self.inner = inner
        self.failures = failures

    async def send(self, message: BrokerMessage) -> None:
        await self.send_batch([message])

    async def send_batch(self, messages: Sequence[BrokerMessage]) -> None:
        if self.failures:
            raise self.failures.pop(0)
        await self.inner.send_batch(messages)


class FlakyPool:
    """An in-memory pool whose publisher fails on demand (``failures``)."""

    def __init__(self, pool: InMemoryBrokerPool) -> None:
        self.pool = pool
        self.failures: list[Exception] = []

    def publisher(self) -> FlakyPublisher:
        return FlakyPublisher(self.pool.publisher(), self.failures)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


def committed(pool: InMemoryBrokerPool, group: str, topic: str) -> int:
    return sum(pool.committed(group, topic, p) or 0 for p in range(pool.partitions))


async def test_malformed_replies_go_to_dead_letter_and_the_consumer_keeps_going(
    manager: SagaManager, pool: InMemoryBrokerPool
) -> None:
    publisher = pool.publisher()
    bad_json = BrokerMessage(
        "orchReply",
        b"k",
        b"{not json",
        {
            H_KIND: "reply",
            H_EXECUTION_ID: str(uuid.uuid4()),
            H_REQUEST_ID: str(uuid.uuid4()),
            H_STATUS: "200",
        },
    )
    no_headers = BrokerMessage("orchReply", b"k", b"{}", {"x": "y"})
    unknown = SagaResponse({}, 200, uuid.uuid4(), uuid.uuid4(), "svc").to_message("orchReply")
    await publisher.send_batch([bad_json, no_headers, unknown])
    saga = Saga("after_bad").remote_step(send("ok")).commit()
    async with FakeParticipant(pool, "svc", ["ok"]):
        execution = await manager.run(saga)
    assert execution.status is SagaStatus.FINISHED
    dead = pool.topic_messages("orchDeadLetter")
    reasons = sorted(m.headers[H_DEAD_LETTER_REASON] for m in dead)
    assert reasons[0].startswith("malformed: saga-kind: header missing")
    assert reasons[1].startswith("malformed: value: invalid JSON")
    assert reasons[2].startswith("unknown execution")
    by_reason = {m.headers[H_DEAD_LETTER_REASON].split(":")[0]: m for m in dead}
    assert (
        by_reason["unknown execution " + str(SagaResponse.from_message(unknown).execution_id)].value == b"{}"
    )
    assert any(m.value == b"{not json" and m.headers[H_STATUS] == "200" for m in dead)  # original bytes
    assert manager.consumer is not None
    stats = manager.consumer.stats
    assert stats["malformed"] == 2 and stats["unknown_execution"] == 1 and stats["applied"] == 1
    assert stats["dead_lettered"] == 3 and stats["received"] == 4
    await eventually(lambda: committed(pool, "orch-orchestrator", "orchReply") == 4)


class ScriptedHandler:
    """Fails with the given exceptions first, then reports ``applied``."""

    def __init__(self, failures: Sequence[Exception]) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def handle_reply(
        self, response: SagaResponse, *, message: BrokerMessage | None = None
    ) -> ReplyOutcome:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "applied"


async def run_consumer(
    pool: InMemoryBrokerPool, handler: Any, messages: list[BrokerMessage]
) -> ReplyConsumer:
    consumer = ReplyConsumer(
        handler,
        pool,
        topic="r",
        group_id="g",
        dead_letter_topic="dlq",
        poll_timeout=0.05,
        retry_initial=0.001,
    )
    await pool.publisher().send_batch(messages)
    async with consumer:
        await eventually(lambda: committed(pool, "g", "r") == len(messages))
    return consumer


async def test_retriable_failures_are_retried_without_committing_past_the_record(
    pool: InMemoryBrokerPool,
) -> None:
    reply = SagaResponse(None, 200, uuid.uuid4(), uuid.uuid4(), "svc").to_message("r")
    handler = ScriptedHandler(
        [SagaBusyError("busy"), StorageUnavailableError("db down"), BrokerConnectionError("broker away")]
    )
    consumer = await run_consumer(pool, handler, [reply])
    assert handler.calls == 4
    assert (
        consumer.stats["retries"] == 3 and consumer.stats["applied"] == 1 and consumer.stats["received"] == 1
    )
    assert pool.topic_messages("dlq") == []


async def test_unexpected_errors_are_dead_lettered(pool: InMemoryBrokerPool) -> None:
    reply = SagaResponse(None, 200, uuid.uuid4(), uuid.uuid4(), "svc").to_message("r")
    consumer = await run_consumer(pool, ScriptedHandler([KeyError("bug")]), [reply])
    [dead] = pool.topic_messages("dlq")
    assert dead.headers[H_DEAD_LETTER_REASON] == "error: KeyError: 'bug'"
    assert consumer.stats["errors"] == 1


async def test_consumer_survives_fetch_errors(pool: InMemoryBrokerPool) -> None:
    handler = ScriptedHandler([])
    consumer = ReplyConsumer(
        handler, pool, topic="r", group_id="g", dead_letter_topic="dlq", retry_initial=0.001
    )
    await consumer.start()
    assert consumer.running
    subscriber = consumer._subscriber
    assert subscriber is not None
    original = subscriber.getmany
    failures = [BrokerConnectionError("blip"), RuntimeError("odd")]

    async def flaky(**kwargs: Any) -> list[BrokerMessage]:
        if failures:
            raise failures.pop(0)
        return await original(**kwargs)

    subscriber.getmany = flaky  # type: ignore[method-assign]
    await pool.publisher().send(SagaResponse(None, 200, uuid.uuid4(), uuid.uuid4()).to_message("r"))
    await eventually(lambda: handler.calls == 1)
    await consumer.stop()
    await consumer.stop()  # idempotent
    assert not consumer.running


async def test_unknown_definition_reply_is_kept_until_the_definition_is_registered(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    elsewhere = Saga("elsewhere").remote_step(send("x")).commit()
    starter = SagaManager(storage, pool, consume_replies=False, relay_outbox=False)
    await starter.setup()
    paused = await starter.run(elsewhere, pause_on_disk=True)
    assert paused.awaiting is not None
    reply = SagaResponse(None, 200, paused.id, paused.awaiting.request_id, "svc").to_message("orchReply")
    stranger = SagaManager(storage, pool, service_name="orch", relay_outbox=False, owner="stranger")
    await pool.publisher().send(reply)
    await stranger.setup()
    try:
        await eventually(lambda: stranger.consumer is not None and stranger.consumer.stats["parked"] == 1)
        assert stranger.consumer is not None and stranger.consumer.stats["unknown_definition"] == 1
        # Recovery here skips it without counting an attempt.
        async with SagaRecoveryWorker(stranger, interval=0.01, max_recovery_attempts=1) as worker:
            await eventually(lambda: worker.stats.released >= 2)
        assert pool.topic_messages("orchDeadLetter") == []
        kept = await storage.load(paused.id)
        assert kept.status is SagaStatus.PAUSED and kept.recovery_attempts == 0
        # A process that registers the definition applies the kept reply.
        owner = SagaManager(storage, pool, service_name="orch", relay_outbox=False, consume_replies=False)
        owner.register(elsewhere)
        await owner.setup()
        async with SagaRecoveryWorker(owner, interval=0.01):
            await eventually(lambda: _status(storage, paused.id, SagaStatus.FINISHED))
    finally:
        await stranger.destroy()
    [applied] = await storage.list_replies(paused.id)
    assert applied.outcome == "applied"


async def _status(storage: MemorySagaStorage, execution_id: uuid.UUID, status: SagaStatus) -> bool:
    return (await storage.load(execution_id)).status is status


async def test_relay_publishes_stored_outbox_rows(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    record = ExecutionRecord(
        id=uuid.uuid4(), name="n", definition_version=1, status=SagaStatus.PAUSED, state=b"{}"
    )
    await storage.create(record, outbox=[OutboxMessage("cmds", b"k", b"1", {"h": "v"})])
    relay = OutboxRelay(storage, pool, owner="relay", interval=0.01)
    async with relay:
        await eventually(lambda: len(pool.topic_messages("cmds")) == 1)
    [message] = pool.topic_messages("cmds")
    assert (message.value, message.headers["h"]) == (b"1", "v")
    assert await storage.fetch_outbox() == []
    assert relay.stats["published"] == 1 and not relay.running
    await relay.stop()  # idempotent


async def test_relay_backs_off_on_broker_errors_and_never_dies(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    record = ExecutionRecord(
        id=uuid.uuid4(), name="n", definition_version=1, status=SagaStatus.PAUSED, state=b"{}"
    )
    await storage.create(record, outbox=[OutboxMessage("cmds", None, b"1")])
    flaky = FlakyPool(pool)
    flaky.failures.extend([BrokerConnectionError("down"), RuntimeError("odd")])
    relay = OutboxRelay(storage, flaky, owner="relay", interval=0.01, lease_seconds=0.0)  # type: ignore[arg-type]
    async with relay:
        await eventually(lambda: len(pool.topic_messages("cmds")) == 1)
    assert relay.stats["errors"] == 2
    with pytest.raises(ValueError):
        OutboxRelay(storage, pool, interval=0)
    with pytest.raises(ValueError):
        OutboxRelay(storage, pool, batch_size=0)


async def test_a_crash_between_save_and_publish_is_covered_by_the_relay(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    flaky = FlakyPool(pool)
    manager = SagaManager(storage, flaky, service_name="orch", relay_interval=0.02, lease_seconds=0.2)  # type: ignore[arg-type]
    await manager.setup()
    flaky.failures.append(BrokerConnectionError("broker away"))
    try:
        paused = await manager.run(Saga("outbox").remote_step(send("cmd")).commit(), pause_on_disk=True)
        assert paused.status is SagaStatus.PAUSED and pool.topic_messages("cmd") == []
        assert (await storage.load(paused.id)).status is SagaStatus.PAUSED  # stored before any publish
        # The relay takes the rows once the failed attempt's lease on them runs out.
        await eventually(lambda: len(pool.topic_messages("cmd")) == 1)
    finally:
        await manager.destroy()
    command = SagaCommand.from_message(pool.topic_messages("cmd")[0])
    assert command.execution_id == paused.id


class BlockingHandler:
    """Always busy for execution ``blocked``; applies everything else."""

    def __init__(self, blocked: uuid.UUID) -> None:
        self.blocked = blocked
        self.applied: list[uuid.UUID] = []

    async def handle_reply(
        self, response: SagaResponse, *, message: BrokerMessage | None = None
    ) -> ReplyOutcome:
        if response.execution_id == self.blocked:
            raise SagaBusyError("held elsewhere", execution_id=self.blocked)
        self.applied.append(response.execution_id)
        return "applied"


@pytest.mark.parametrize("blocked_first", [True, False])
async def test_executions_are_handled_concurrently_and_only_the_handled_prefix_is_committed(
    blocked_first: bool,
) -> None:
    pool = InMemoryBrokerPool(partitions=1)
    blocked, free = uuid.uuid4(), uuid.uuid4()
    order = [blocked, free] if blocked_first else [free, blocked]
    await pool.publisher().send_batch(
        [SagaResponse(None, 200, execution, uuid.uuid4()).to_message("r") for execution in order]
    )
    handler = BlockingHandler(blocked)
    consumer = ReplyConsumer(
        handler, pool, topic="r", group_id="g", dead_letter_topic="dlq", retry_initial=0.005
    )
    await consumer.start()
    await eventually(lambda: handler.applied == [free])  # not stuck behind the busy execution
    await consumer.stop()
    assert pool.committed("g", "r", 0) == (None if blocked_first else 1)
    assert consumer.stats["retries"] >= 1
    with pytest.raises(ValueError, match="concurrency"):
        ReplyConsumer(handler, pool, topic="r", group_id="g", dead_letter_topic="dlq", concurrency=0)


class GatedHandler:
    """Applies replies in the order it sees them; those of execution ``slow`` wait for ``release``."""

    def __init__(self, slow: uuid.UUID) -> None:
        self.slow = slow
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.applied: list[tuple[uuid.UUID, Any]] = []

    async def handle_reply(
        self, response: SagaResponse, *, message: BrokerMessage | None = None
    ) -> ReplyOutcome:
        if response.execution_id == self.slow:
            self.entered.set()
            await self.release.wait()
        else:  # later replies take fewer turns: handled concurrently, they would overtake earlier ones
            for _ in range(10 - response.content):
                await asyncio.sleep(0)
        self.applied.append((response.execution_id, response.content))
        return "applied"


def gated_consumer(pool: InMemoryBrokerPool, handler: GatedHandler, **kw: Any) -> ReplyConsumer:
    return ReplyConsumer(handler, pool, topic="r", group_id="g", dead_letter_topic="dlq", **kw)


def reply(execution: uuid.UUID, n: int = 0) -> BrokerMessage:
    return SagaResponse(n, 200, execution, uuid.uuid4()).to_message("r")


async def test_a_slow_reply_holds_up_neither_other_executions_nor_later_fetches() -> None:
    pool = InMemoryBrokerPool(partitions=1)
    slow, other, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    handler = GatedHandler(slow)
    consumer = gated_consumer(pool, handler, max_records=1)  # one record per fetch: later batches
    await consumer.start()
    try:
        await pool.publisher().send(reply(slow))
        await asyncio.wait_for(handler.entered.wait(), 5)
        for n in range(10):
            await pool.publisher().send(reply(other if n % 2 else third, n))
        await eventually(lambda: len(handler.applied) == 10)
        for execution in (other, third):
            assert [n for e, n in handler.applied if e == execution] == sorted(
                n for e, n in handler.applied if e == execution
            )
        assert pool.committed("g", "r", 0) is None  # the slow reply at offset 0 holds the partition
        handler.release.set()
        await eventually(lambda: pool.committed("g", "r", 0) == 11)
    finally:
        await consumer.stop()
    assert handler.applied[-1] == (slow, 0)


async def test_stop_lets_the_reply_in_progress_finish_and_commits_it() -> None:
    pool = InMemoryBrokerPool(partitions=1)
    slow = uuid.uuid4()
    handler = GatedHandler(slow)
    consumer = gated_consumer(pool, handler)
    await consumer.start()
    await pool.publisher().send(reply(slow))
    await asyncio.wait_for(handler.entered.wait(), 5)
    stopping = asyncio.create_task(consumer.stop())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not stopping.done() and pool.committed("g", "r", 0) is None
    handler.release.set()
    await asyncio.wait_for(stopping, 5)
    assert handler.applied == [(slow, 0)] and pool.committed("g", "r", 0) == 1


class OverlapHandler:
    """Records the replies it applies and the most it ever had in progress at once."""

    def __init__(self) -> None:
        self.in_progress = 0
        self.most = 0
        self.applied: list[Any] = []

    async def handle_reply(
        self, response: SagaResponse, *, message: BrokerMessage | None = None
    ) -> ReplyOutcome:
        self.in_progress += 1
        self.most = max(self.most, self.in_progress)
        try:
            for _ in range(5):
                await asyncio.sleep(0)
            self.applied.append(response.content)
        finally:
            self.in_progress -= 1
        return "applied"


async def test_replies_of_one_execution_under_other_keys_are_handled_one_at_a_time_in_order() -> None:
    # A re-keyed copy, or a participant keying its replies by something else, lands in another partition:
    # the execution id header still puts it in the execution's lane, behind the replies fetched before it.
    pool = InMemoryBrokerPool(partitions=4)
    execution = uuid.uuid4()
    records = [dataclasses.replace(reply(execution, n), key=f"key-{n}".encode()) for n in range(12)]
    partition = {n: partition_for_key(r.key or b"", 4) for n, r in enumerate(records)}
    assert len(set(partition.values())) > 1
    handler = OverlapHandler()
    consumer = ReplyConsumer(handler, pool, topic="r", group_id="g", dead_letter_topic="dlq")
    for record in records:
        await pool.publisher().send(record)
    await consumer.start()
    try:
        await eventually(lambda: len(handler.applied) == len(records))
    finally:
        await consumer.stop()
    assert handler.most == 1
    for p in set(partition.values()):  # fetch order is kept within each partition
        mine = [n for n in range(len(records)) if partition[n] == p]
        assert [n for n in handler.applied if n in mine] == mine
