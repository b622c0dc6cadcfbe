"""The backward step logic of `SagaExecution`: compensating executed steps in reverse order.

Only steps that did something are compensated (see `saga.execution_steps`), and only those with an
``on_failure``. A compensation that keeps failing after its retries puts the run in DEAD_LETTER, with the
original error kept as ``cause`` so a retried run that finishes compensating ends ERRORED with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from saga.errors import SagaContextError
from saga.messages import SagaResponse, SagaResponseStatus
from saga.state import AwaitedRequest, Transition, exception_error, moved
from saga.step_support import (
    ActionStep,
    as_request,
    compensation_policy,
    context_error,
    emit,
    log_exhausted,
    new_record,
    new_request,
    reply_error,
    resend,
    set_status,
    take_result,
    update_record,
)
from saga.steps import LocalSagaStep, RemoteSagaStep, invoke
from storage import SagaStatus

if TYPE_CHECKING:
    from saga.execution import SagaExecution

__all__: list[str] = []

_PAUSED = SagaStatus.PAUSED
_COMPENSATING = SagaStatus.COMPENSATING
_ERRORED = SagaStatus.ERRORED
_DEAD_LETTER = SagaStatus.DEAD_LETTER


async def begin_compensation(ex: SagaExecution, error: dict[str, Any]) -> Transition:
    """Switch to compensating the executed steps in reverse (or end ERRORED when there are none)."""
    ex.error = error
    ex.phase = "compensate"
    ex.compensated = 0
    ex.attempt = 0
    ex.awaiting = None
    if next_compensation(ex) is None:
        return await end_compensation(ex, error.get("step"))
    await set_status(ex, _COMPENSATING)
    return moved(_COMPENSATING, error.get("step"))


def next_compensation(ex: SagaExecution) -> ActionStep | None:
    """The next executed step that has a compensation, skipping those without one."""
    while ex.compensated < len(ex.executed):
        step = ex.step_at(ex.executed[-1 - ex.compensated])
        if isinstance(step, LocalSagaStep | RemoteSagaStep) and step.failure_fn is not None:
            return step
        ex.compensated += 1
    return None


async def end_compensation(ex: SagaExecution, step: str | None) -> Transition:
    """Everything is compensated: ERRORED, with reject for the participants when autocommitting."""
    error = ex.error
    if error is not None and "cause" in error:
        ex.error = dict(error["cause"])  # a retried DEAD_LETTER finished compensating
    await set_status(ex, _ERRORED)
    outbox = ex._decision("reject") if ex.autocommit else ()
    return Transition(_ERRORED, outbox, step=step) if outbox else moved(_ERRORED, step)


async def compensation_done(ex: SagaExecution, step: ActionStep, attempt: int) -> Transition:
    """One compensation succeeded (after ``attempt`` tries): move to the next one, or end ERRORED."""
    ex.compensated += 1
    ex.attempt = 0
    if ex.hooks is not None:
        await emit(ex, "on_compensation_completed", step.name, attempt)
    if next_compensation(ex) is None:
        return await end_compensation(ex, step.name)
    await set_status(ex, _COMPENSATING)
    return moved(_COMPENSATING, step.name)


async def compensate_next(ex: SagaExecution, now: datetime) -> Transition:
    """Run (or send) the next compensation."""
    step = next_compensation(ex)
    if step is None:
        return await end_compensation(ex, None)
    attempt = ex.attempt + 1
    if attempt == 1:
        ex._attempt_started = now
    started = ex._attempt_started or now
    if ex.hooks is not None:
        await emit(ex, "on_compensation_started", step.name, attempt)
    assert step.failure_fn is not None
    try:
        result = await invoke(step.failure_fn, ex.context)
        if isinstance(step, LocalSagaStep):
            take_result(ex, result)
            new_record(ex, step, "compensate", "succeeded", attempt, started)
            return await compensation_done(ex, step, attempt)
        if result is None:
            new_record(ex, step, "compensate", "skipped", attempt, started)
            return await compensation_done(ex, step, attempt)
        path = ex.executed[-1 - ex.compensated]
        request = as_request(result, step.name)
        awaiting, message = new_request(ex, step, request, "compensate", now, attempt, len(ex.steps), path)
    except SagaContextError as exc:
        raise context_error(exc, step.name) from None
    except Exception as exc:
        ex._restore_context()
        error = exception_error(step.name, exc)
        if ex.hooks is not None:
            await emit(ex, "on_compensation_failed", step.name, attempt, error)
        policy = compensation_policy(ex, step)
        if policy.allows(attempt):
            ex.attempt = attempt
            return Transition(ex.status, persist=False, retry_after=policy.delay(attempt), step=step.name)
        new_record(ex, step, "compensate", "failed", attempt, started, error=error)
        log_exhausted(ex, step.name, "compensate", attempt, error)
        return await dead_letter(ex, step.name, error)
    new_record(ex, step, "compensate", "waiting", attempt, started, request_id=awaiting.request_id)
    ex.awaiting = awaiting
    await set_status(ex, _PAUSED)
    return Transition(_PAUSED, (message,), step=step.name)


async def compensation_replied(
    ex: SagaExecution,
    awaiting: AwaitedRequest,
    status: SagaResponseStatus,
    response: SagaResponse,
    now: datetime,
) -> Transition:
    """Apply the reply to a compensation command: anything but 200 is a failed compensation."""
    step = ex.step_at(awaiting.path)
    assert isinstance(step, RemoteSagaStep)
    if status is SagaResponseStatus.SUCCESS:
        update_record(ex, awaiting.record, "succeeded")
        return await compensation_done(ex, step, awaiting.attempt)
    error = reply_error(step.name, response)
    if ex.hooks is not None:
        await emit(ex, "on_compensation_failed", step.name, awaiting.attempt, error)
    if compensation_policy(ex, step).allows(awaiting.attempt):
        return await resend(ex, step, awaiting, now)
    update_record(ex, awaiting.record, "failed", error=error)
    return await dead_letter(ex, step.name, error)


async def dead_letter(ex: SagaExecution, step: str, compensation_error: Mapping[str, Any]) -> Transition:
    """A compensation failed for good: a person must look. The original error is kept as ``cause``."""
    cause = dict(ex.error or {})
    cause = dict(cause.get("cause", cause))
    ex.error = {
        "step": step,
        "error": cause.get("error"),
        "failed_step": cause.get("step"),
        "compensation_error": compensation_error.get("error"),
        "cause": cause,
    }
    ex.awaiting = None
    await set_status(ex, _DEAD_LETTER)
    return moved(_DEAD_LETTER, step)


async def compensation_timed_out(
    ex: SagaExecution, awaiting: AwaitedRequest, step: ActionStep, error: dict[str, Any]
) -> Transition:
    """A compensation command's reply never came, and its retries are spent: DEAD_LETTER."""
    update_record(ex, awaiting.record, "failed", error=error)
    if ex.hooks is not None:
        await emit(ex, "on_compensation_failed", step.name, awaiting.attempt, error)
    return await dead_letter(ex, step.name, error)
