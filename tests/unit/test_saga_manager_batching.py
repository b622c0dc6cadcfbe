"""Work the manager batches: one storage poll for all waiting runs, sent-marks, claims of replies."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from broker import InMemoryBrokerPool
from saga import Saga, SagaBusyError, SagaContext, SagaManager, SagaRequest, SagaResponse, SagaStatus
from storage import ExecutionNotFoundError, ExecutionRecord
from storage.memory import MemorySagaStorage
from tests.unit.conftest import CountingStorage, FakeParticipant, eventually


def send(topic: str) -> Any:
    def build(ctx: SagaContext) -> SagaRequest:
        return SagaRequest(topic, {"n": ctx.get("n")})

    return build


class _BatchLoadingStorage(MemorySagaStorage):
    """A memory storage that answers ``load_many`` and records each call's ids."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[uuid.UUID]] = []

    async def load_many(self, ids: Sequence[uuid.UUID]) -> list[ExecutionRecord]:
        self.batches.append(list(ids))
        found = []
        for execution_id in ids:
            try:
                found.append(await self.load(execution_id))
            except Exception:
                continue
        return found


async def test_many_waiting_runs_are_polled_in_one_query_per_interval(pool: InMemoryBrokerPool) -> None:
    storage = _BatchLoadingStorage()
    counted = CountingStorage(storage)
    manager = SagaManager(
        counted,
        pool,
        consume_replies=False,
        relay_outbox=False,
        wait_poll_interval=0.02,
    )
    await manager.setup()
    saga = manager.register(Saga("slow").remote_step(send("void")).commit())
    try:
        runs = [asyncio.create_task(manager.run(saga, {"n": i})) for i in range(20)]
        await eventually(lambda: len(storage.batches) >= 3)
        assert all(len(batch) == 20 for batch in storage.batches[:3])
        assert counted.calls["load"] == 0  # no waiter reads its own execution
        # Another process finishes them: the next poll resolves every waiter.
        for execution_id in storage.batches[0]:
            record = await storage.load(execution_id)
            await storage.save(
                ExecutionRecord(
                    id=record.id,
                    name=record.name,
                    definition_version=record.definition_version,
                    status=SagaStatus.FINISHED,
                    state=record.state,
                    steps=record.steps,
                    version=record.version,
                )
            )
        done = await asyncio.wait_for(asyncio.gather(*runs), 5)
        assert {e.status for e in done} == {SagaStatus.FINISHED}
    finally:
        await manager.destroy()


async def test_an_execution_deleted_while_waited_on_fails_the_wait(pool: InMemoryBrokerPool) -> None:
    storage = _BatchLoadingStorage()
    manager = SagaManager(storage, pool, consume_replies=False, relay_outbox=False, wait_poll_interval=0.02)
    await manager.setup()
    saga = manager.register(Saga("gone").remote_step(send("void")).commit())
    try:
        run = asyncio.create_task(manager.run(saga))
        await eventually(lambda: bool(storage.batches))
        storage._executions.clear()
        with pytest.raises(ExecutionNotFoundError):
            await asyncio.wait_for(run, 5)
    finally:
        await manager.destroy()


async def test_published_rows_are_marked_sent_without_holding_up_the_step(pool: InMemoryBrokerPool) -> None:
    storage = MemorySagaStorage()
    gate = asyncio.Event()
    marked: list[list[int]] = []
    original = storage.mark_outbox_sent

    async def slow_mark(ids: Sequence[int]) -> None:
        await gate.wait()
        marked.append(list(ids))
        await original(ids)

    storage.mark_outbox_sent = slow_mark  # type: ignore[method-assign]
    manager = SagaManager(storage, pool, consume_replies=False, relay_outbox=False)
    await manager.setup()
    saga = manager.register(Saga("marks").remote_step(send("cmd")).commit())
    try:
        # Every run pauses and returns although no mark has been written yet.
        paused = [await manager.run(saga, {"n": i}, pause_on_disk=True) for i in range(5)]
        assert {e.status for e in paused} == {SagaStatus.PAUSED}
        assert len(pool.topic_messages("cmd")) == 5 and marked == []
        gate.set()
        await eventually(lambda: sum(map(len, marked)) == 5)
        # Marks wait MARK_SENT_DELAY for company: the five publishes share one UPDATE (two if the runs
        # took longer than the delay, the first mark then holding at the gate while the others gather).
        assert len(marked) <= 2
        assert await storage.fetch_outbox(lease_seconds=-1) == []
    finally:
        await manager.destroy()


async def test_destroy_writes_pending_marks_before_storage_stops(pool: InMemoryBrokerPool) -> None:
    storage = MemorySagaStorage()
    manager = SagaManager(storage, pool, relay_outbox=False, service_name="orch")
    await manager.setup()
    saga = manager.register(Saga("flush").remote_step(send("cmd")).commit())
    async with FakeParticipant(pool, "svc", ["cmd"]):
        execution = await manager.run(saga)
    await manager.destroy()
    assert execution.status is SagaStatus.FINISHED
    assert await storage.fetch_outbox(lease_seconds=-1) == []


async def test_replies_handled_together_are_claimed_in_one_statement(pool: InMemoryBrokerPool) -> None:
    storage = CountingStorage(MemorySagaStorage())
    # Without the records of paused runs in hand, every reply takes a claim (see
    # test_saga_manager_unclaimed.py for the replies that need none).
    manager = SagaManager(storage, pool, consume_replies=False, relay_outbox=False, paused_cache_size=0)
    await manager.setup()
    saga = manager.register(Saga("together").remote_step(send("cmd")).commit())
    try:
        paused = [await manager.run(saga, {"n": i}, pause_on_disk=True) for i in range(5)]
        held = paused[-1]
        assert await storage.inner.claim(held.id, "another-worker", lease_seconds=60) is not None
        storage.calls.clear()
        replies = [SagaResponse({"ok": 1}, 200, e.id, e.awaiting.request_id, "svc") for e in paused]  # type: ignore[union-attr]
        outcomes = await asyncio.gather(*(manager.handle_reply(r) for r in replies), return_exceptions=True)
        assert outcomes[:4] == ["applied"] * 4
        assert isinstance(outcomes[4], SagaBusyError)  # the one another worker holds
        # One claim_many for all five; the single claim only for the one it did not get (to say why).
        assert storage.calls["claim_many"] == 1 and storage.calls["claim"] == 1
        for execution in paused[:4]:
            assert (await storage.inner.load(execution.id)).status is SagaStatus.FINISHED
    finally:
        await manager.destroy()


async def test_a_reply_handled_alone_takes_the_single_claim(pool: InMemoryBrokerPool) -> None:
    storage = CountingStorage(MemorySagaStorage())
    # Without the records of paused runs in hand, every reply takes a claim (see
    # test_saga_manager_unclaimed.py for the replies that need none).
    manager = SagaManager(storage, pool, consume_replies=False, relay_outbox=False, paused_cache_size=0)
    await manager.setup()
    saga = manager.register(Saga("alone").remote_step(send("cmd")).commit())
    try:
        paused = await manager.run(saga, pause_on_disk=True)
        assert paused.awaiting is not None
        storage.calls.clear()
        assert (
            await manager.handle_reply(SagaResponse(None, 200, paused.id, paused.awaiting.request_id))
            == "applied"
        )
        assert storage.calls["claim"] == 1 and storage.calls["claim_many"] == 0
    finally:
        await manager.destroy()


async def test_an_unknown_execution_in_a_claim_batch_fails_only_its_own_reply(
    pool: InMemoryBrokerPool,
) -> None:
    storage = CountingStorage(MemorySagaStorage())
    # Without the records of paused runs in hand, every reply takes a claim (see
    # test_saga_manager_unclaimed.py for the replies that need none).
    manager = SagaManager(storage, pool, consume_replies=False, relay_outbox=False, paused_cache_size=0)
    await manager.setup()
    saga = manager.register(Saga("mixed").remote_step(send("cmd")).commit())
    try:
        paused = [await manager.run(saga, {"n": i}, pause_on_disk=True) for i in range(3)]
        unknown = SagaResponse({"ok": 1}, 200, uuid.uuid4(), uuid.uuid4(), "svc")
        real = [SagaResponse({"ok": 1}, 200, e.id, e.awaiting.request_id, "svc") for e in paused]  # type: ignore[union-attr]
        # The unknown one first: its failure must not reach the replies claimed with it.
        outcomes = await asyncio.gather(
            *(manager.handle_reply(r) for r in [unknown, *real]), return_exceptions=True
        )
        assert isinstance(outcomes[0], ExecutionNotFoundError)
        assert outcomes[1:] == ["applied"] * 3
        for execution in paused:
            stored = await storage.inner.load(execution.id)
            assert stored.status is SagaStatus.FINISHED and stored.owner is None
    finally:
        await manager.destroy()
