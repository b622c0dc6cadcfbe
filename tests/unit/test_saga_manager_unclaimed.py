"""A reply to an execution this manager paused itself is applied from the record in hand, without a claim.

The claim read the row and took its lease in one statement per remote step; the manager that paused the run
has just written that row, so it keeps the record (``paused_cache_size``) and lets the version-checked save
decide instead. These tests pin down when the claim is skipped, when it is still taken (a local step with
effects runs next), and that a copy made stale by another worker falls back to the claim and writes nothing
twice.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker import InMemoryBrokerPool
from saga import Saga, SagaContext, SagaManager, SagaRequest, SagaResponse, SagaStatus
from saga.errors import SagaConfigError
from saga.execution import SagaExecution
from storage.memory import MemorySagaStorage
from tests.unit.conftest import CountingStorage


def _send(ctx: SagaContext) -> SagaRequest:
    return SagaRequest("stock", {"order": ctx["order"]})


def _counting_handler(runs: Counter[str]) -> Any:
    def on_success(ctx: SagaContext, response: SagaResponse) -> SagaContext:
        runs["on_success"] += 1
        ctx["reserved"] = response.content
        return ctx

    return on_success


def _reply(execution: SagaExecution, content: Any = "ok") -> SagaResponse:
    assert execution.awaiting is not None
    return SagaResponse(content, 200, execution.id, execution.awaiting.request_id, "stock")


def _manager(storage: Any, pool: InMemoryBrokerPool, **options: Any) -> SagaManager:
    return SagaManager(storage, broker_pool=pool, consume_replies=False, relay_outbox=False, **options)


async def _paused(manager: SagaManager, saga: Saga, order: int = 1) -> SagaExecution:
    execution = await manager.run(saga, {"order": order}, pause_on_disk=True)
    assert isinstance(execution, SagaExecution) and execution.status is SagaStatus.PAUSED
    return execution


@contextlib.asynccontextmanager
async def _two_workers(
    storage: MemorySagaStorage, pool: InMemoryBrokerPool, saga: Saga
) -> AsyncIterator[tuple[SagaManager, SagaManager]]:
    """Two managers (two workers) on one storage, both knowing ``saga``."""
    here, other = _manager(storage, pool), _manager(storage, pool)
    await here.setup()
    await other.setup()
    try:
        here.register(saga)
        other.register(saga)
        yield here, other
    finally:
        await here.destroy()
        await other.destroy()


@pytest.fixture
def pool() -> InMemoryBrokerPool:
    return InMemoryBrokerPool()


async def test_the_reply_to_a_run_paused_here_takes_no_claim(pool: InMemoryBrokerPool) -> None:
    runs: Counter[str] = Counter()
    storage = CountingStorage(MemorySagaStorage())
    manager = _manager(storage, pool)
    await manager.setup()
    try:
        saga = Saga("one").remote_step(_send).on_success(_counting_handler(runs)).commit()
        execution = await _paused(manager, saga)
        storage.calls.clear()
        assert await manager.handle_reply(_reply(execution)) == "applied"
        assert storage.calls["claim"] == 0 and storage.calls["save"] == 1
        stored = await storage.inner.load(execution.id)
        assert stored.status is SagaStatus.FINISHED and stored.owner is None
        assert (await manager.get(execution.id)).context == {"order": 1, "reserved": "ok"}
        assert runs["on_success"] == 1
    finally:
        await manager.destroy()


async def test_a_local_step_after_the_reply_runs_under_the_claim(pool: InMemoryBrokerPool) -> None:
    storage = CountingStorage(MemorySagaStorage())
    manager = _manager(storage, pool)
    owners: list[str | None] = []
    ids: list[uuid.UUID] = []

    async def ship(ctx: SagaContext) -> None:
        owners.append((await storage.inner.load(ids[0])).owner)

    await manager.setup()
    try:
        saga = Saga("mixed").remote_step(_send).local_step(ship).commit()
        execution = await _paused(manager, saga)
        ids.append(execution.id)
        storage.calls.clear()
        assert await manager.handle_reply(_reply(execution)) == "applied"
        assert owners == [manager.owner]  # the local step ran while this manager held the claim
        assert storage.calls["claim"] == 1
        stored = await storage.inner.load(execution.id)
        assert stored.status is SagaStatus.FINISHED and stored.owner is None
    finally:
        await manager.destroy()


async def test_a_row_changed_meanwhile_falls_back_to_the_claim(pool: InMemoryBrokerPool) -> None:
    runs: Counter[str] = Counter()
    inner = MemorySagaStorage()
    saga = Saga("one").remote_step(_send).on_success(_counting_handler(runs)).commit()
    async with _two_workers(inner, pool, saga) as (here, other):
        execution = await _paused(here, saga)
        # Another worker claims and releases the run (a recovery pass finding it not overdue): the row's
        # version moves on, so the copy kept here is stale.
        assert (await other.recover(execution.id)).status is SagaStatus.PAUSED
        assert await here.handle_reply(_reply(execution)) == "applied"
        stored = await inner.load(execution.id)
        assert stored.status is SagaStatus.FINISHED and stored.owner is None
        assert [s.status for s in stored.steps] == ["succeeded"]
        # The unclaimed attempt's save was refused; the claimed way applied the reply again.
        assert runs["on_success"] == 2


async def test_a_reply_another_worker_applied_is_a_duplicate_here(pool: InMemoryBrokerPool) -> None:
    runs: Counter[str] = Counter()
    inner = MemorySagaStorage()
    saga = (
        Saga("two")
        .remote_step(_send, name="reserve")
        .on_success(_counting_handler(runs))
        .remote_step(_send, name="charge")
        .on_success(_counting_handler(runs))
        .commit()
    )
    async with _two_workers(inner, pool, saga) as (here, other):
        execution = await _paused(here, saga)
        first = _reply(execution, "first")
        assert await other.handle_reply(first) == "applied"  # its partition had moved to the other worker
        # The same reply, redelivered here: the stale copy would apply it; the save refuses, the claim
        # sees it answered already.
        assert await here.handle_reply(first) == "duplicate"
        stored = await inner.load(execution.id)
        assert stored.status is SagaStatus.PAUSED and stored.owner is None
        assert [s.status for s in stored.steps] == ["succeeded", "waiting"]
        assert (await here.get(execution.id)).context["reserved"] == "first"


async def _claims_per_reply(pool: InMemoryBrokerPool, cache_size: int, runs: int) -> list[int]:
    """Pause ``runs`` executions, then answer them newest first: the claims each reply took."""
    saga = Saga("one").remote_step(_send).commit()
    storage = CountingStorage(MemorySagaStorage())
    manager = _manager(storage, pool, paused_cache_size=cache_size)
    await manager.setup()
    try:
        paused = [await _paused(manager, saga, order) for order in range(runs)]
        claims = []
        for execution in reversed(paused):
            storage.calls.clear()
            assert await manager.handle_reply(_reply(execution)) == "applied"
            claims.append(storage.calls["claim"])
        return claims
    finally:
        await manager.destroy()


async def test_the_records_kept_are_bounded(pool: InMemoryBrokerPool) -> None:
    # The oldest of three was dropped to make room for the newest: its reply takes the claim.
    assert await _claims_per_reply(pool, cache_size=2, runs=3) == [0, 0, 1]


async def test_a_cache_size_of_zero_claims_every_reply(pool: InMemoryBrokerPool) -> None:
    assert await _claims_per_reply(pool, cache_size=0, runs=2) == [1, 1]


def test_a_negative_cache_size_is_refused(pool: InMemoryBrokerPool) -> None:
    with pytest.raises(SagaConfigError, match="paused_cache_size"):
        _manager(MemorySagaStorage(), pool, paused_cache_size=-1)
