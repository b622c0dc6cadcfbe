"""Minos's saga API on kafka-saga: constructor forms, statuses, replies, the driving API and its errors."""

from __future__ import annotations

from typing import Any

import pytest

import saga
import saga.compat.minos as minos
from broker import BrokerMessage, InMemoryBrokerPool
from saga import SagaContext, SagaManager, SagaRequest, SagaResponseStatus
from saga.compat.minos import (
    AlreadyOnSagaException,
    ConditionalSagaStep,
    ElseThenAlternative,
    EmptySagaException,
    IfThenAlternative,
    LocalSagaStep,
    MultipleElseThenException,
    RemoteSagaStep,
    Saga,
    SagaExecution,
    SagaExecutionAlreadyExecutedException,
    SagaFailedExecutionException,
    SagaNotCommittedException,
    SagaNotDefinedException,
    SagaPausedExecutionStepException,
    SagaResponse,
    SagaRollbackExecutionException,
    SagaStatus,
    UndefinedOnExecuteException,
)
from saga.messages import AWAITED_REQUEST_ID, SagaCommand
from tests.unit.conftest import FakeParticipant, eventually


def send(ctx: SagaContext) -> SagaRequest:
    return SagaRequest("Reserve", {"n": ctx.get("n", 0)})


def approve(ctx: SagaContext) -> SagaRequest:
    return SagaRequest("Approve", {})


def cancel(ctx: SagaContext) -> SagaRequest:
    return SagaRequest("Release", {})


async def keep(ctx: SagaContext, response: Any) -> SagaContext:
    ctx.got = await response.content()
    return ctx


def mark(ctx: SagaContext) -> SagaContext:
    ctx.marks = ctx.get("marks", 0) + 1
    return ctx


def unmark(ctx: SagaContext) -> SagaContext:
    ctx.unmarked = ctx.get("unmarked", 0) + 1
    return ctx


def test_exports_are_sorted_and_importable() -> None:
    assert minos.__all__ == sorted(minos.__all__)
    assert all(hasattr(minos, name) for name in minos.__all__)
    assert minos.SagaFailedExecutionException is saga.SagaExecutionError
    assert minos.SagaManager is saga.SagaManager and minos.SagaStatus is saga.SagaStatus


def test_statuses_by_minos_names() -> None:
    assert SagaStatus.Finished is SagaStatus.FINISHED and SagaStatus.Errored is SagaStatus.ERRORED
    assert SagaStatus.from_raw("paused") is SagaStatus.Paused and SagaStatus.Running.raw == "running"
    assert SagaStatus.from_raw(SagaStatus.Created) is SagaStatus.CREATED
    assert [s.value for s in SagaStatus].count("finished") == 1  # aliases do not repeat in iteration
    with pytest.raises(ValueError, match="'done' is not a saga status; expected one of created"):
        SagaStatus.from_raw("done")
    assert SagaResponseStatus.from_raw(400) is SagaResponseStatus.ERROR


def test_saga_response_the_minos_way_and_the_wrong_way() -> None:
    execution_id = saga.SagaExecution.from_definition(Saga().local_step(mark).commit()).uuid
    response = SagaResponse({"ok": 1}, {"payments"}, SagaResponseStatus.ERROR, uuid=execution_id)
    assert isinstance(response, saga.SagaResponse)
    assert (response.content, response.status, response.uuid) == ({"ok": 1}, 400, execution_id)
    assert response.related_services == {"payments"} and response.service_name == "payments"
    assert not response.ok and response.request_id == AWAITED_REQUEST_ID
    assert SagaResponse().ok and SagaResponse(status=500).status is SagaResponseStatus.SYSTEM_ERROR
    with pytest.raises(ValueError, match="related_services: a reply comes from one service"):
        SagaResponse(None, {"a", "b"})
    # kafka-saga's own form refuses Minos's positional related_services instead of taking it as status.
    with pytest.raises(TypeError, match=r"status must be .* saga\.compat\.minos\.SagaResponse"):
        saga.SagaResponse({"ok": 1}, {"payments"})  # type: ignore[arg-type]
    ours = saga.SagaResponse({"ok": 1}, SagaResponseStatus.SUCCESS, service_name="s")
    assert ours.ok and ours.related_services == {"s"} and ours.uuid == ours.execution_id


def test_steps_made_on_their_own_and_saga_steps() -> None:
    remote = RemoteSagaStep(on_execute=send, on_success=keep, on_failure=cancel)
    local = LocalSagaStep(mark, unmark)
    with pytest.raises(SagaNotDefinedException, match="belongs to no saga yet"):
        local.commit()
    definition = Saga(steps=[remote, local])
    assert definition.committed and definition.steps == (remote, local)
    assert [s.name for s in definition.steps] == ["send", "mark"]
    with pytest.raises(AlreadyOnSagaException):
        Saga().local_step(local)
    open_one = Saga(steps=[LocalSagaStep(mark)], committed=False)
    assert not open_one.committed
    with pytest.raises(SagaNotCommittedException):
        open_one.validate()
    added = (
        Saga().remote_step(RemoteSagaStep(send)).remote_step(send).local_step(LocalSagaStep(mark)).commit()
    )
    assert added.step_names() == ["send", "send_2", "mark"]
    with pytest.raises(EmptySagaException):
        Saga().validate()
    with pytest.raises(UndefinedOnExecuteException):
        Saga(steps=[RemoteSagaStep(on_success=keep)])
    with pytest.raises(saga.SagaDefinitionError, match="cannot be added as a local step"):
        Saga().local_step(RemoteSagaStep(send))  # type: ignore[arg-type]


def test_conditional_step_alternative_objects_and_one_branch_saga_twice() -> None:
    sub = Saga().local_step(mark).commit()
    step = ConditionalSagaStep(if_then=IfThenAlternative(lambda ctx: ctx["n"] > 1, sub), else_then=None)
    step.else_then(sub)
    with pytest.raises(MultipleElseThenException):
        step.else_then(sub)
    definition = Saga(steps=[step])
    assert definition.step_names() == ["conditional_step_1", "mark", "mark"]
    assert step.if_then_alternatives == [IfThenAlternative(step.branches[0][0], sub)]
    assert step.else_then_alternative == ElseThenAlternative(sub)
    only_else = Saga().conditional_step().else_then(sub).commit()
    only_else.validate()


def test_parameters_of_a_minos_callback() -> None:
    def add(ctx: SagaContext, amount: int, twice: bool = False) -> SagaContext:
        ctx.total = ctx.get("total", 0) + amount * (2 if twice else 1)
        return ctx

    definition = Saga().local_step().on_execute(add, {"amount": 2}, twice=True).commit()
    assert definition.step_names() == ["add"]
    assert definition.same_definition(Saga().local_step().on_execute(add, {"amount": 2}, twice=True).commit())
    assert not definition.same_definition(Saga().local_step().on_execute(add, {"amount": 3}).commit())


async def test_execution_driven_in_process_the_minos_way() -> None:
    definition = Saga().local_step(mark).on_failure(unmark).remote_step(send).on_success(keep).commit()
    execution = SagaExecution.from_definition(definition, SagaContext(n=3))
    assert execution.status == SagaStatus.Running
    with pytest.raises(SagaPausedExecutionStepException, match="waits for the reply to step 'send'"):
        await execution.execute()
    assert execution.status == SagaStatus.Paused
    [command] = [
        SagaCommand.from_message(BrokerMessage(m.topic, m.key, m.value, dict(m.headers)))
        for m in execution.outbox
    ]
    assert (command.target, command.content) == ("Reserve", {"n": 3})
    context = await execution.execute(response=SagaResponse({"reserved": 3}, {"stock"}, uuid=execution.uuid))
    assert execution.status == SagaStatus.Finished and context == {"n": 3, "marks": 1, "got": {"reserved": 3}}
    assert len(execution.outbox) == 2  # the command, then the commit to "stock" (autocommit)
    with pytest.raises(SagaExecutionAlreadyExecutedException):
        await execution.execute()

    await execution.rollback()
    assert execution.status == SagaStatus.Errored and execution.context["unmarked"] == 1
    with pytest.raises(SagaRollbackExecutionException, match="already rolled back"):
        await execution.rollback()


async def test_execute_raises_minos_failure_and_compensates() -> None:
    definition = Saga().local_step(mark).on_failure(unmark).remote_step(send).on_success(keep).commit()
    execution = SagaExecution.from_definition(definition)
    with pytest.raises(SagaPausedExecutionStepException):
        await execution.execute(autocommit=False)
    with pytest.raises(SagaFailedExecutionException, match="ended errored"):
        await execution.execute(
            response=SagaResponse({"no": 1}, {"stock"}, SagaResponseStatus.ERROR), autocommit=False
        )
    assert execution.status == SagaStatus.Errored and execution.context["unmarked"] == 1
    assert len(execution.outbox) == 1  # autocommit=False: no reject written
    assert await execution.execute(response=SagaResponse()) == execution.context  # late reply: no change
    with pytest.raises(SagaNotCommittedException):
        SagaExecution.from_definition(Saga(steps=[LocalSagaStep(mark)], committed=False))
    with pytest.raises(saga.SagaDefinitionError, match=r"a LocalSagaStep .* end the chain with \.commit"):
        SagaExecution.from_definition(Saga().local_step(mark))  # type: ignore[arg-type]


async def test_two_equal_nameless_definitions_share_one_registration(manager: SagaManager) -> None:
    def build() -> saga.Saga:
        return Saga().local_step(lambda ctx: mark(ctx)).local_step(mark).commit()

    first, second = build(), build()
    a = await manager.run(first)
    b = await manager.run(second)
    again = await manager.run(second)
    assert a.name == b.name == again.name and len(manager.registry) == 1
    assert b.status == SagaStatus.Finished and b.context == {"marks": 2}
    other = Saga().local_step(lambda ctx: unmark(ctx)).local_step(mark).commit()  # other lambda, same names
    with pytest.raises(
        saga.SagaDefinitionError, match=r"give it another name with register\(saga, name=\.\.\.\)"
    ):
        await manager.run(other)


async def test_run_with_a_minos_response_and_autocommit_per_call(
    manager: SagaManager, pool: InMemoryBrokerPool
) -> None:
    definition = Saga().remote_step(send).on_success(keep).remote_step(approve).on_success(keep).commit()
    async with FakeParticipant(pool, "stock", ["Reserve"], lambda command: (200, {"first": True})) as stock:
        started = await manager.run(definition, pause_on_disk=True)
        await _until(manager, started.uuid, lambda ex: len(stock.commands) == 1)
    # The participant is gone: the second reply is built the Minos way, without a request id.
    response = SagaResponse({"second": True}, {"stock"}, uuid=started.uuid)
    done = await manager.run(response=response, autocommit=False)
    assert done.status == SagaStatus.Finished and done.context["got"] == {"second": True}
    assert not done.decision_sent  # autocommit=False given with the reply holds
    committed = await manager.commit(done.uuid)
    assert committed.decision_sent


async def _until(manager: SagaManager, execution_id: Any, predicate: Any) -> None:
    async def awaits_second() -> bool:
        execution = await manager.get(execution_id)
        return (
            predicate(execution) and execution.awaiting is not None and execution.steps[-1].name == "approve"
        )

    await eventually(awaits_second)
