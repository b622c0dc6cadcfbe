"""The outbox as a queue of independent rows, fencing of commands, one clock and the retry backoff (memory).

The same rules run against the real Kafka and PostgreSQL in ``tests/e2e/faults/``; these pin them where
they are decided, with the in-memory broker (``max_message_size`` standing in for the producer's limit).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker import BrokerMessage, InMemoryBrokerPool
from saga import RetryPolicy, Saga, SagaContext, SagaManager, SagaRequest, SagaStatus
from saga.clock import DatabaseClock
from saga.relay import publish_outbox
from storage import OutboxMessage
from storage.memory import MemorySagaStorage
from tests.unit.conftest import FakeParticipant, eventually

LIMIT = 1000


def ship(context: SagaContext) -> SagaRequest:
    return SagaRequest(context["topic"], {"blob": "x" * context["size"]})


@pytest.fixture
def limited_pool() -> InMemoryBrokerPool:
    return InMemoryBrokerPool(max_message_size=LIMIT)


@pytest.fixture
async def limited(storage: MemorySagaStorage, limited_pool: InMemoryBrokerPool) -> AsyncIterator[SagaManager]:
    manager = SagaManager(storage, limited_pool, service_name="orders", relay_interval=0.05)
    await manager.setup()
    try:
        yield manager
    finally:
        await manager.destroy()


async def test_a_command_over_the_limit_fails_its_step_before_it_is_stored(
    storage: MemorySagaStorage, limited: SagaManager
) -> None:
    saga = Saga("ship").remote_step(ship, name="ship").commit()
    execution = await limited.run(saga, {"topic": "ships", "size": 5 * LIMIT}, raise_on_error=False)
    assert execution.status is SagaStatus.ERRORED
    (step,) = execution.steps
    assert step.error is not None
    assert step.error["type"] == "publish_rejected" and step.error["reason"] == "record_too_large"
    assert step.error["size"] > step.error["limit"] == LIMIT
    assert storage.outbox_outcomes(execution.id) == []


async def test_a_refused_row_fails_its_own_step_and_the_rows_behind_it_go_out(
    storage: MemorySagaStorage, limited_pool: InMemoryBrokerPool, limited: SagaManager
) -> None:
    """A stored row the broker refuses (an empty topic here) fails only its saga; a batch behind it flows."""
    saga = Saga("ship").remote_step(ship, name="ship").commit()
    async with FakeParticipant(limited_pool, "shipping", ["ships"]):
        bad = await limited.run(saga, {"topic": "", "size": 1}, pause_on_disk=True)
        good = [await limited.run(saga, {"topic": "ships", "size": 1}, pause_on_disk=True) for _ in range(3)]

        async def settled() -> bool:
            statuses = [(await storage.load(e.id)).status for e in (bad, *good)]
            return statuses == [SagaStatus.ERRORED] + [SagaStatus.FINISHED] * 3

        await eventually(settled)
    record = await storage.load(bad.id)
    assert record.steps[0].error is not None and record.steps[0].error["type"] == "publish_rejected"
    assert [outcome for _, outcome, _ in storage.outbox_outcomes(bad.id)] == ["rejected"]


async def test_a_transient_failure_backs_off_that_row_only(storage: MemorySagaStorage) -> None:
    pool = InMemoryBrokerPool()
    request = uuid.uuid4()
    created = await storage.create(
        _paused(request), outbox=[OutboxMessage("t", None, b"1", {}, request), OutboxMessage("t", None, b"2")]
    )

    class Flaky:
        """Refuses the first record transiently, once."""

        def __init__(self) -> None:
            self.failed = False

        def publisher(self) -> Any:
            inner = pool.publisher()
            outer = self

            class Publisher:
                async def send_batch(self, messages: list[BrokerMessage]) -> None:
                    await inner.send_batch(messages)

                async def send_each(self, messages: list[BrokerMessage]) -> list[Any]:
                    from broker import BrokerConnectionError

                    if not outer.failed:
                        outer.failed = True
                        rest = await inner.send_each(messages[1:])
                        return [BrokerConnectionError("leader moving"), *rest]
                    return list(await inner.send_each(messages))

            return Publisher()

    assert await publish_outbox(storage, Flaky(), owner="relay") == 1  # type: ignore[arg-type]
    assert [m.value for m in pool.topic_messages("t")] == [b"2"]
    assert await publish_outbox(storage, Flaky(), owner="relay") == 0  # backing off  # type: ignore[arg-type]
    (row,) = [r for r in storage._outbox.values() if r.sent_at is None]
    assert row.attempts == 1 and row.claimed_until is not None
    assert created.id == row.record.execution_id


async def test_a_500_retry_is_due_after_the_policy_delay(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool
) -> None:
    manager = SagaManager(storage, pool, service_name="orders", relay_outbox=False)
    await manager.setup()
    try:
        saga = (
            Saga("flaky")
            .remote_step(lambda ctx: SagaRequest("charge", {}), name="charge", retry=RetryPolicy(3, 5.0))
            .commit()
        )
        execution = await manager.run(saga, pause_on_disk=True)
        (first,) = pool.topic_messages("charge")
        from saga.messages import SagaCommand, SagaResponse, SagaResponseStatus

        command = SagaCommand.from_message(first)
        reply = SagaResponse(None, SagaResponseStatus.SYSTEM_ERROR, execution.id, command.request_id, "pay")
        assert await manager.handle_reply(reply) == "applied"
        assert len(pool.topic_messages("charge")) == 1  # not yet: due in 5 s
        assert await publish_outbox(storage, pool, owner=None) == 0
        (row,) = [r for r in storage._outbox.values() if r.sent_at is None]
        assert row.claimed_by is None and row.claimed_until is not None
        assert row.claimed_until - row.record.created_at == timedelta(seconds=5)
    finally:
        await manager.destroy()


def test_jittered_delays_stay_within_half_and_all_of_the_delay() -> None:
    policy = RetryPolicy(max_attempts=5, initial_delay=1.0, backoff=2.0, max_delay=10.0)
    assert policy.jittered_delay(3, rand=lambda: 0.0) == 2.0
    assert policy.jittered_delay(3, rand=lambda: 1.0) == 4.0
    assert policy.delay(10_000) == 10.0  # no overflow for a row retried for ever


async def test_the_database_clock_follows_the_storage_not_the_host() -> None:
    skewed = datetime(2030, 1, 1, tzinfo=UTC)
    storage = MemorySagaStorage(clock=lambda: skewed)
    clock = DatabaseClock(fallback=lambda: datetime(2000, 1, 1, tzinfo=UTC))
    assert clock().year == 2000 and not clock.synced
    await clock.sync(storage)
    assert clock.synced and abs(clock() - skewed) < timedelta(seconds=1)


def _paused(request: uuid.UUID) -> Any:
    from storage import ExecutionRecord

    return ExecutionRecord(uuid.uuid4(), "x", 1, SagaStatus.PAUSED, b"{}", awaiting_request=request)
