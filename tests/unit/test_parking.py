"""Replies kept with an execution whose definition version the receiving process does not register."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from broker import InMemoryBrokerPool
from saga import Saga, SagaBusyError, SagaContext, SagaManager, SagaRequest, SagaResponse, SagaStatus
from saga.parking import MAX_PARKED_REPLIES, clear_parked, park_reply, parked_replies
from storage import ExecutionRecord, MemorySagaStorage


def remote() -> Saga:
    def ask(context: SagaContext) -> SagaRequest:
        return SagaRequest("Ask", {"n": 1})

    return Saga("kept").remote_step(ask, name="ask", timeout=60).commit()


def test_park_and_clear_round_trip_and_bound_the_list() -> None:
    deadline = datetime(2030, 1, 1, tzinfo=UTC)
    record = ExecutionRecord(
        id=uuid.uuid4(),
        name="n",
        definition_version=1,
        status=SagaStatus.PAUSED,
        state=b'{"v":1}',
        reply_deadline=deadline,
    )
    now = datetime(2029, 1, 1, tzinfo=UTC)
    reply = SagaResponse({"ok": True}, 200, record.id, uuid.uuid4(), "svc").to_message("r")
    parked = record
    for _ in range(MAX_PARKED_REPLIES + 3):
        parked = park_reply(parked, reply, now)
    assert parked.reply_deadline == now  # due for recovery at once
    messages = parked_replies(parked, "r")
    assert len(messages) == MAX_PARKED_REPLIES
    assert SagaResponse.from_message(messages[0]).content == {"ok": True}
    cleared = clear_parked(parked)
    assert parked_replies(cleared, "r") == [] and cleared.reply_deadline == deadline
    assert cleared.state == b'{"v":1}'
    assert parked_replies(record, "r") == []


async def test_parking_waits_for_claims_and_keeps_nothing_for_a_finished_execution() -> None:
    storage, pool = MemorySagaStorage(), InMemoryBrokerPool()
    saga = remote()
    async with SagaManager(storage, pool, consume_replies=False, relay_outbox=False) as owner:
        owner.register(saga)
        execution = await owner.run(saga, pause_on_disk=True)
        assert execution.awaiting is not None
        reply = SagaResponse({}, 200, execution.id, execution.awaiting.request_id, "svc")
        stranger = SagaManager(storage, pool, consume_replies=False, relay_outbox=False, owner="x")
        # Registered here after all: retriable, so the consumer's retry applies the reply.
        with pytest.raises(SagaBusyError, match="registered here"):
            await owner.park_reply(reply)
        await storage.claim(execution.id, "someone", lease_seconds=60)
        with pytest.raises(SagaBusyError, match="claimed by someone"):
            await stranger.park_reply(reply)
        await storage.release_claim(execution.id, "someone")
        assert await stranger.park_reply(reply) is True
        recovered = await owner.recover(execution.id)  # applies the kept reply
        assert recovered.status is SagaStatus.FINISHED
        assert await stranger.park_reply(reply) is False  # a finished execution keeps nothing
        assert [r.outcome for r in await storage.list_replies(execution.id)] == ["applied", "stale"]


async def test_a_kept_reply_that_is_stale_is_dropped_and_the_deadline_restored() -> None:
    storage, pool = MemorySagaStorage(), InMemoryBrokerPool()
    saga = remote()
    async with SagaManager(storage, pool, consume_replies=False, relay_outbox=False) as owner:
        owner.register(saga)
        execution = await owner.run(saga, pause_on_disk=True)
        before = await storage.load(execution.id)
        stale = SagaResponse({}, 200, execution.id, uuid.uuid4(), "svc")  # answers no request of it
        stranger = SagaManager(storage, pool, consume_replies=False, relay_outbox=False, owner="x")
        assert await stranger.park_reply(stale) is True
        assert (await storage.load(execution.id)).reply_deadline != before.reply_deadline
        still = await owner.recover(execution.id)
        assert still.status is SagaStatus.PAUSED
        after = await storage.load(execution.id)
        assert parked_replies(after, owner.reply_topic) == []
        assert after.reply_deadline == before.reply_deadline
        assert [r.outcome for r in await storage.list_replies(execution.id)] == ["stale"]
