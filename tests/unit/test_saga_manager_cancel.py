"""`SagaManager.cancel`: stop forward progress and compensate what ran, through the failure path."""

from __future__ import annotations

import uuid

import pytest

from broker import InMemoryBrokerPool
from saga import Saga, SagaContext, SagaManager, SagaRequest, SagaResponse, SagaStateError, SagaStatus
from storage.memory import MemorySagaStorage
from tests.unit.conftest import FakeParticipant, eventually


def _saga(undone: list[str]) -> Saga:
    def reserve(ctx: SagaContext) -> None:
        ctx["reserved"] = True

    def unreserve(ctx: SagaContext) -> None:
        undone.append("reserve")

    def pay(ctx: SagaContext) -> SagaRequest:
        return SagaRequest("pay", {"amount": 3})

    return Saga("cancellable").local_step(reserve).on_failure(unreserve).remote_step(pay).commit()


async def test_cancel_a_paused_execution_compensates_what_ran(
    manager: SagaManager, storage: MemorySagaStorage
) -> None:
    undone: list[str] = []
    paused = await manager.run(_saga(undone), pause_on_disk=True)
    assert paused.status is SagaStatus.PAUSED

    cancelled = await manager.cancel(paused.id, reason="customer called")

    assert cancelled.status is SagaStatus.ERRORED
    assert undone == ["reserve"]
    stored = await storage.load(paused.id)
    assert stored.status is SagaStatus.ERRORED
    assert stored.error == {"step": None, "error": "customer called", "type": "cancelled"}
    pay = next(s for s in stored.steps if s.name == "pay")
    assert pay.status == "failed" and pay.error is not None and pay.error["type"] == "cancelled"
    # the participant's late answer no longer applies to anything
    request_id = pay.request_id
    assert request_id is not None
    late = SagaResponse(execution_id=paused.id, request_id=request_id, status=200, content={})
    await manager.handle_reply(late)
    assert (await storage.load(paused.id)).status is SagaStatus.ERRORED
    assert undone == ["reserve"]


async def test_cancel_refuses_ended_executions(manager: SagaManager) -> None:
    undone: list[str] = []
    paused = await manager.run(_saga(undone), pause_on_disk=True)
    await manager.cancel(paused.id)
    with pytest.raises(SagaStateError, match="cannot cancel"):
        await manager.cancel(paused.id)
    assert undone == ["reserve"]


async def test_cancel_a_dead_lettered_forward_run(
    manager: SagaManager, storage: MemorySagaStorage, pool: InMemoryBrokerPool
) -> None:
    """Recovery gave up on it while going forward: cancel compensates instead of retrying."""
    undone: list[str] = []
    paused = await manager.run(_saga(undone), pause_on_disk=True)
    record = await storage.load(paused.id)
    await storage.increment_recovery_attempts(record.id, SagaStatus.DEAD_LETTER)
    cancelled = await manager.cancel(paused.id)
    assert cancelled.status is SagaStatus.ERRORED and undone == ["reserve"]


async def test_cancel_unknown_execution(manager: SagaManager) -> None:
    from storage import ExecutionNotFoundError

    with pytest.raises(ExecutionNotFoundError):
        await manager.cancel(uuid.uuid4())


async def test_cancel_compensates_the_awaited_remote_step_remotely(
    manager: SagaManager, storage: MemorySagaStorage, pool: InMemoryBrokerPool
) -> None:
    """The participant may have run the awaited command: cancel sends its compensation too, durably."""

    def hold(ctx: SagaContext) -> SagaRequest:
        return SagaRequest("hold", {"n": 1})

    def unhold(ctx: SagaContext) -> SagaRequest:
        return SagaRequest("unhold", {"n": 1})

    saga = Saga("remote-cancel").remote_step(hold).on_failure(unhold).commit()
    paused = await manager.run(saga, pause_on_disk=True)  # nobody answers "hold"
    async with FakeParticipant(pool, "svc", ["unhold"]) as undo:
        cancelled = await manager.cancel(paused.id)
        assert cancelled.status is SagaStatus.PAUSED  # waiting for the compensation's reply
        await eventually(lambda: _status(storage, paused.id, SagaStatus.ERRORED))
    assert [c.target for c in undo.commands] == ["unhold"]


async def _status(storage: MemorySagaStorage, saga_id: uuid.UUID, status: SagaStatus) -> bool:
    return (await storage.load(saga_id)).status is status
