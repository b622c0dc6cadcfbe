"""`SagaParticipant` consuming as a pipeline: sagas in parallel, each in order, commits behind.

Ordering is controlled with events: a gated command holds its handler until the test releases it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker import BrokerError, BrokerMessage, InMemoryBrokerPool
from broker.memory import partition_for_key
from saga import CommandContext, SagaParticipant
from saga.messages import SagaCommand
from tests.unit.conftest import eventually

GROUP = "svc-participant"


def on_partition(partition: int) -> uuid.UUID:
    """An execution id whose records land on ``partition`` of a two-partition topic."""
    while True:
        execution = uuid.uuid4()
        if partition_for_key(str(execution).encode(), 2) == partition:
            return execution


def command(execution: uuid.UUID, n: int, *, gate: bool = False) -> BrokerMessage:
    return SagaCommand(
        target="Do",
        content={"n": n, "gate": gate},
        execution_id=execution,
        request_id=uuid.uuid4(),
        reply_topic="reply",
        idempotency_key=uuid.uuid4().hex,
    ).to_message()


class Service:
    """A participant whose gated commands wait for ``release``; handled ``n`` kept in order."""

    def __init__(self, pool: Any, **kw: Any) -> None:
        self.participant = SagaParticipant("svc", pool, **kw)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.handled: list[int] = []
        self.participant.command("Do")(self.do)

    async def do(self, request: CommandContext) -> int:
        if request.content["gate"]:
            self.entered.set()
            await self.release.wait()
        self.handled.append(request.content["n"])
        return int(request.content["n"])


@pytest.fixture
async def pool() -> AsyncIterator[InMemoryBrokerPool]:
    async with InMemoryBrokerPool(partitions=2) as pool:
        yield pool


async def test_a_slow_command_holds_up_only_its_own_partition(pool: InMemoryBrokerPool) -> None:
    service = Service(pool, max_records=1)  # one record per poll: later polls go on meanwhile
    first, second = on_partition(0), on_partition(1)
    async with service.participant:
        await pool.publisher().send(command(first, 0, gate=True))
        await asyncio.wait_for(service.entered.wait(), 5)
        await pool.publisher().send_batch(
            [command(first, 1), command(second, 2), command(second, 3), command(first, 4)]
        )
        await eventually(lambda: service.handled == [2, 3])
        assert pool.committed(GROUP, "Do", 0) is None  # nothing passes the record still in progress
        await eventually(lambda: pool.committed(GROUP, "Do", 1) == 2)
        service.release.set()
        await eventually(lambda: pool.committed(GROUP, "Do", 0) == 3)
    assert service.handled == [2, 3, 0, 1, 4]  # partition 0 in offset order


async def test_a_slow_command_holds_up_only_its_own_saga_within_a_partition(
    pool: InMemoryBrokerPool,
) -> None:
    service = Service(pool, max_records=1)
    slow, other = on_partition(0), on_partition(0)
    async with service.participant:
        await pool.publisher().send(command(slow, 0, gate=True))
        await asyncio.wait_for(service.entered.wait(), 5)
        await pool.publisher().send_batch([command(slow, 1), command(other, 2), command(other, 3)])
        await eventually(lambda: service.handled == [2, 3])  # same partition, another saga: not held up
        assert pool.committed(GROUP, "Do", 0) is None  # the commit never passes the record in progress
        service.release.set()
        await eventually(lambda: pool.committed(GROUP, "Do", 0) == 4)
    assert service.handled == [2, 3, 0, 1]  # the slow saga's own commands in offset order


async def test_stop_finishes_the_command_in_progress_and_commits_it(pool: InMemoryBrokerPool) -> None:
    service = Service(pool)
    await service.participant.start()
    await pool.publisher().send(command(on_partition(0), 0, gate=True))
    await asyncio.wait_for(service.entered.wait(), 5)
    stopping = asyncio.create_task(service.participant.stop())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not stopping.done()
    service.release.set()
    await asyncio.wait_for(stopping, 5)
    assert service.handled == [0] and pool.committed(GROUP, "Do", 0) == 1
    assert len(pool.topic_messages("reply")) == 1


async def test_stop_cancels_a_command_that_overstays_the_grace(pool: InMemoryBrokerPool) -> None:
    service = Service(pool)
    await service.participant.start()
    await pool.publisher().send_batch([command(on_partition(0), 0, gate=True), command(on_partition(1), 1)])
    await asyncio.wait_for(service.entered.wait(), 5)
    await eventually(lambda: pool.committed(GROUP, "Do", 1) == 1)
    await service.participant.stop(grace=0)
    assert service.handled == [1] and pool.committed(GROUP, "Do", 0) is None
    assert not service.participant.running


class BrokenDeadLetters:
    """A pool whose dead-letter topic refuses records for good."""

    def __init__(self, inner: InMemoryBrokerPool) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def publisher(self) -> BrokenDeadLetters:
        return self

    async def send(self, message: BrokerMessage) -> None:
        if message.topic == "svcDeadLetter":
            raise BrokerError("record too large")
        await self.inner.publisher().send(message)


async def test_a_record_that_cannot_be_set_aside_stops_the_consumer_after_the_others(
    pool: InMemoryBrokerPool,
) -> None:
    service = Service(BrokenDeadLetters(pool))
    run = asyncio.create_task(service.participant.run())
    await eventually(lambda: service.participant.running)
    good = on_partition(1)
    await pool.publisher().send_batch(
        [command(good, 0, gate=True), BrokerMessage("Do", str(on_partition(0)).encode(), b"{bad", {})]
    )
    await asyncio.wait_for(service.entered.wait(), 5)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not run.done()  # the good command in progress finishes first
    service.release.set()
    with pytest.raises(BrokerError, match="record too large"):
        await asyncio.wait_for(run, 5)
    assert pool.committed(GROUP, "Do", 1) == 1 and pool.committed(GROUP, "Do", 0) is None


def test_concurrency_must_be_positive(pool: InMemoryBrokerPool) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        SagaParticipant("svc", pool, concurrency=0)
