"""The definition DSL: Minos-style chains, step names, validation errors that name the step."""

from __future__ import annotations

import functools

import pytest

from saga import RetryPolicy, Saga, SagaContext, SagaDefinitionError, SagaRegistry, SagaRequest
from saga.errors import (
    EmptySagaStepException,
    SagaNotCommittedException,
    UndefinedOnExecuteException,
    UnknownSagaDefinitionError,
)
from saga.steps import ConditionalSagaStep, LocalSagaStep, RemoteSagaStep, invoke


def send_order(ctx: SagaContext) -> SagaRequest:
    return SagaRequest("orders", {})


def order_ok(ctx: SagaContext, response: object) -> SagaContext:
    return ctx


def cancel_order(ctx: SagaContext) -> SagaRequest:
    return SagaRequest("cancel", {})


def confirm(ctx: SagaContext) -> None:
    return None


def test_minos_style_chain_builds_steps_in_order() -> None:
    saga = (
        Saga("order", version=2)
        .remote_step(send_order)
        .on_success(order_ok)
        .on_error(order_ok)
        .on_failure(cancel_order)
        .local_step(confirm)
        .on_failure(confirm)
        .remote_step()
        .on_execute(lambda ctx: SagaRequest("orders", {}))
        .commit()
    )
    assert saga.name == "order" and saga.version == 2 and saga.committed
    kinds = [type(step) for step in saga.steps]
    assert kinds == [RemoteSagaStep, LocalSagaStep, RemoteSagaStep]
    first = saga.steps[0]
    assert isinstance(first, RemoteSagaStep)
    assert (
        first.execute_fn is send_order and first.success_fn is order_ok and first.failure_fn is cancel_order
    )
    assert [step.name for step in saga.steps] == ["send_order", "confirm", "remote_step_3"]
    assert first.saga is saga
    assert "committed" in repr(saga) and "send_order" in repr(first)


def test_step_names_explicit_derived_and_positional() -> None:
    saga = (
        Saga("names")
        .local_step(lambda ctx: None)
        .local_step(functools.partial(confirm))
        .local_step(confirm, name="explicit")
        .remote_step(send_order, name="remote")
        .commit(confirm)
    )
    assert saga.step_names() == ["local_step_1", "local_step_2", "explicit", "remote", "commit"]


def test_commit_with_function_adds_a_final_step() -> None:
    saga = Saga("x").local_step(confirm, name="first").commit(confirm)
    assert saga.steps[-1].name == "commit"
    assert isinstance(saga.steps[-1], LocalSagaStep)


def test_validation_empty_saga() -> None:
    with pytest.raises(SagaDefinitionError, match="'empty' has no steps"):
        Saga("empty").commit()


def test_validation_remote_step_without_on_execute_names_the_step() -> None:
    with pytest.raises(SagaDefinitionError, match="remote step 'reserve' has no on_execute") as info:
        Saga("x").remote_step(name="reserve").on_success(order_ok).commit()
    assert info.value.step == "reserve"


def test_a_local_step_without_on_execute_is_refused_not_named_after_its_compensation() -> None:
    with pytest.raises(
        UndefinedOnExecuteException, match="local step 'local_step_1' has no on_execute"
    ) as info:
        Saga("x").local_step().on_failure(confirm).commit()
    assert info.value.step == "local_step_1"
    with pytest.raises(EmptySagaStepException, match="local step 'local_step_1' has no callback at all"):
        Saga("x").local_step().commit()


def test_validation_duplicate_explicit_names_also_across_sub_sagas() -> None:
    with pytest.raises(SagaDefinitionError, match="duplicate step name 'confirm'"):
        Saga("x").local_step(confirm, name="confirm").local_step(send_order, name="confirm").commit()
    sub = Saga().local_step(confirm).commit()
    with pytest.raises(
        SagaDefinitionError, match=r"duplicate step name 'confirm'.*branch 1 of 'choose'"
    ) as info:
        Saga("x").local_step(order_ok, name="confirm").conditional_step(name="choose").if_then(
            lambda c: True, sub
        ).commit()
    assert info.value.step == "confirm"


def test_one_callback_in_several_steps_and_branches_gets_numbered_names() -> None:
    sub = Saga().local_step(confirm).commit()
    saga = (
        Saga("x")
        .local_step(confirm)
        .local_step(confirm)
        .remote_step(send_order)
        .remote_step(send_order)
        .conditional_step(name="choose")
        .if_then(lambda c: True, sub)
        .else_then(sub)
        .commit()
    )
    assert saga.step_names() == [
        "confirm_2", "confirm_3", "send_order", "send_order_2", "choose", "confirm", "confirm",
    ]  # fmt: skip


def test_validation_steps_after_commit_and_hooks_set_twice() -> None:
    saga = Saga("x").local_step(confirm).commit()
    with pytest.raises(SagaDefinitionError, match="already committed"):
        saga.local_step(confirm, name="late")
    with pytest.raises(SagaDefinitionError, match="already committed"):
        saga.commit()
    with pytest.raises(SagaDefinitionError, match="cannot set on_failure on step 'confirm'"):
        saga.steps[0].on_failure(confirm)  # type: ignore[attr-defined]
    with pytest.raises(SagaDefinitionError, match="on_success of step 'send_order' is already set") as info:
        Saga("y").remote_step(send_order).on_success(order_ok).on_success(order_ok)
    assert info.value.step == "send_order"
    with pytest.raises(SagaDefinitionError, match="on_execute of step 'confirm' is already set"):
        Saga("z").local_step(confirm).on_execute(confirm)
    with pytest.raises(SagaDefinitionError, match="must be callable"):
        Saga("w").local_step().on_execute(3)  # type: ignore[arg-type]


def test_validation_of_options() -> None:
    with pytest.raises(SagaDefinitionError, match="timeout of step 'send_order'"):
        Saga("x").remote_step(send_order, timeout=0)
    with pytest.raises(SagaDefinitionError, match="retry of step 'confirm' must be a RetryPolicy"):
        Saga("x").local_step(confirm, retry=3)  # type: ignore[arg-type]
    with pytest.raises(SagaDefinitionError, match="version"):
        Saga("x", version=0)
    with pytest.raises(SagaDefinitionError, match="name"):
        Saga("")
    with pytest.raises(SagaDefinitionError, match="deadline"):
        Saga("x", deadline=-1)
    with pytest.raises(SagaDefinitionError, match="compensation_retry"):
        Saga("x", compensation_retry=1)  # type: ignore[arg-type]
    with pytest.raises(SagaDefinitionError, match="step name"):
        Saga("x").local_step(confirm, name="")


def test_conditional_step_validation() -> None:
    sub = Saga().local_step(confirm, name="sub").commit()
    with pytest.raises(SagaDefinitionError, match="conditional step 'pick' has no if_then"):
        Saga("x").conditional_step(name="pick").commit()
    open_saga = Saga()
    open_saga.local_step(confirm)
    with pytest.raises(SagaDefinitionError, match="needs a committed Saga"):
        Saga("x").conditional_step().if_then(lambda c: True, open_saga)
    with pytest.raises(SagaDefinitionError, match="needs a Saga"):
        Saga("x").conditional_step().if_then(lambda c: True, "saga")  # type: ignore[arg-type]
    with pytest.raises(SagaDefinitionError, match="condition of step"):
        Saga("x").conditional_step().if_then(True, sub)  # type: ignore[arg-type]
    step = Saga("x").conditional_step().if_then(lambda c: True, sub).else_then(sub)
    with pytest.raises(SagaDefinitionError, match="else_then of step 'conditional_step_1' is already set"):
        step.else_then(sub)
    with pytest.raises(SagaDefinitionError, match="if_then after else_then"):
        step.if_then(lambda c: False, sub)
    saga = Saga("own")
    with pytest.raises(SagaDefinitionError, match="needs a committed Saga"):
        saga.conditional_step().if_then(lambda c: True, saga)


def test_conditional_chain_and_branch_lookup() -> None:
    a = Saga().local_step(confirm, name="a").commit()
    b = Saga().local_step(confirm, name="b").commit()
    c = Saga().local_step(confirm, name="c").commit()
    saga = (
        Saga("cond")
        .conditional_step(name="pick")
        .if_then(lambda ctx: ctx.x == 1, a)
        .if_then(lambda ctx: ctx.x == 2, b)
        .else_then(c)
        .local_step(confirm, name="after")
        .commit()
    )
    step = saga.steps[0]
    assert isinstance(step, ConditionalSagaStep)
    assert step.branch(0) is a and step.branch(1) is b and step.branch(2) is c
    assert step.sub_sagas() == [a, b, c]
    assert saga.step_names() == ["pick", "a", "b", "c", "after"]


def test_retry_policy_validation_and_backoff() -> None:
    policy = RetryPolicy(max_attempts=4, initial_delay=0.5, backoff=2.0, max_delay=1.5)
    assert [policy.delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 1.5]
    assert policy.allows(3) and not policy.allows(4)
    assert not RetryPolicy().allows(1)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(TypeError, match="max_attempts"):
        RetryPolicy(max_attempts=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backoff"):
        RetryPolicy(backoff=0.5)
    with pytest.raises(ValueError, match="initial_delay"):
        RetryPolicy(initial_delay=-1)
    with pytest.raises(ValueError, match="max_delay"):
        RetryPolicy(initial_delay=5, max_delay=1)
    with pytest.raises(TypeError, match="finite"):
        RetryPolicy(initial_delay=float("inf"))


def test_registry_names_and_refuses_conflicts() -> None:
    registry = SagaRegistry()
    nameless = Saga()
    nameless.local_step(confirm)
    with pytest.raises(SagaNotCommittedException, match=r"not committed: call \.commit\(\)"):
        registry.register(nameless, name="named")
    assert nameless.name is None and len(registry) == 0
    nameless.commit()
    registered = registry.register(nameless, name="named")
    assert registered is nameless and nameless.name == "named" and nameless.committed
    assert registry.register(nameless) is nameless  # same object again: fine
    assert ("named", 1) in registry and len(registry) == 1 and list(registry) == [nameless]
    assert registry.keys() == [("named", 1)]
    with pytest.raises(SagaDefinitionError, match="already registered with another definition"):
        registry.register(Saga("named").local_step(confirm).commit())
    with pytest.raises(SagaDefinitionError, match="cannot be renamed"):
        registry.register(nameless, name="other")
    derived = registry.register(Saga().local_step(confirm, name="only").commit())
    assert derived.name == Saga().local_step(confirm, name="only").commit().derived_name()
    assert derived.name is not None and derived.name.startswith("saga_")
    with pytest.raises(UnknownSagaDefinitionError, match="'nope' version 1"):
        registry.get("nope", 1)
    with pytest.raises(SagaDefinitionError, match="expected a Saga"):
        registry.register("saga")  # type: ignore[arg-type]


async def test_invoke_calls_sync_and_async_callbacks() -> None:
    async def later(x: int) -> int:
        return x + 1

    assert await invoke(lambda x: x * 2, 2) == 4
    assert await invoke(later, 2) == 3
    assert await invoke(lambda: None) is None
