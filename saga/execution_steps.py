"""The forward step logic of `SagaExecution`: running local steps, sending commands, applying replies.

Split from `saga.execution` to keep each module readable; these functions are the execution's private
methods and mutate it in place. Rules they implement:

* one call runs one step (conditions are decided inline and do not count as a step);
* a failed callback leaves the context as it was last stored (no half-applied changes);
* a step is compensated only if it did something: a local step that returned, a remote step whose
  participant replied 200, or one whose reply never came (it may have run).
"""

from __future__ import annotations

import inspect
from collections.abc import Coroutine
from datetime import datetime
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from saga.compensation import begin_compensation
from saga.context import SagaContext
from saga.errors import SagaContextError, SagaStateError
from saga.messages import SagaResponse, SagaResponseStatus
from saga.state import AwaitedRequest, Transition, exception_error, moved
from saga.step_support import (
    as_request,
    context_error,
    emit,
    log_exhausted,
    move_next,
    new_record,
    new_request,
    reply_error,
    resend,
    running,
    set_status,
    take_result,
    update_record,
)
from saga.steps import ConditionalSagaStep, LocalSagaStep, RemoteSagaStep, SagaStep, invoke
from storage import SagaStatus
from storage.records import new_step_record

if TYPE_CHECKING:
    from saga.execution import SagaExecution

__all__: list[str] = []

_RUNNING = SagaStatus.RUNNING
_PAUSED = SagaStatus.PAUSED
_FINISHED = SagaStatus.FINISHED


def execute_next(ex: SagaExecution, now: datetime) -> Coroutine[Any, Any, Transition]:
    """The move that runs the step under the cursor (deciding conditionals on the way), to be awaited.

    Not a coroutine itself: it picks the step's own coroutine, so running a step costs no frame of its
    own here.
    """
    cursor = ex.cursor
    if len(cursor) == 1:
        top = ex.definition._steps
        if cursor[0] >= len(top):
            return finish(ex, None)
        step = top[cursor[0]]
    else:
        step = ex.step_at(cursor)
    if type(step) is LocalSagaStep:
        return run_local(ex, step, now)
    if type(step) is RemoteSagaStep:
        return send_remote(ex, step, now)
    # Subclasses (saga.compat.minos's steps) after the exact types, which take no ABC-style check.
    if isinstance(step, LocalSagaStep):
        return run_local(ex, step, now)
    if isinstance(step, RemoteSagaStep):
        return send_remote(ex, step, now)
    assert isinstance(step, ConditionalSagaStep)
    return _through(ex, step, now)


async def _through(ex: SagaExecution, step: ConditionalSagaStep, now: datetime) -> Transition:
    """Decide a conditional step, then run the step the cursor lands on."""
    failed = await choose_branch(ex, step, now)
    if failed is not None:
        return failed
    return await execute_next(ex, now)


async def choose_branch(ex: SagaExecution, step: ConditionalSagaStep, now: datetime) -> Transition | None:
    """Evaluate the conditions and move the cursor into the chosen branch (or past the step)."""
    chosen: int | None = None
    try:
        for i, (condition, _) in enumerate(step.branches):
            if await invoke(condition, ex.context):
                chosen = i
                break
        else:
            if step.else_saga is not None:
                chosen = len(step.branches)
    except SagaContextError as exc:
        raise context_error(exc, step.name) from None
    except Exception as exc:
        ex._restore_context()
        error = exception_error(step.name, exc)
        new_record(ex, step, "execute", "failed", 1, now, error=error)
        return await begin_compensation(ex, error)
    new_record(ex, step, "execute", "skipped" if chosen is None else "succeeded", 1, now)
    if chosen is None:
        move_next(ex)  # may reach the end: the caller's loop finishes then
    else:
        ex.cursor.extend((chosen, 0))
    return None


async def step_done(ex: SagaExecution, step: str, compensable: bool) -> Transition:
    """Step ``step`` completed: remember it for compensation, move the cursor on, maybe finish."""
    cursor = ex.cursor
    if len(cursor) == 1:  # top level: the common case, without the general walk
        index = cursor[0]
        if compensable:
            ex.executed.append((index,))
        cursor[0] = index + 1
        if index + 1 >= len(ex.definition._steps):
            return await finish(ex, step)
    else:
        if compensable:
            ex.executed.append(tuple(cursor))
        move_next(ex)
        if len(cursor) == 1 and cursor[0] >= len(ex.definition._steps):
            return await finish(ex, step)
    if ex.status is not _RUNNING:
        await set_status(ex, _RUNNING)
    return running(step)


async def run_local(ex: SagaExecution, step: LocalSagaStep, now: datetime) -> Transition:
    """Run a local step once: done, a retry after a delay, or the start of compensation."""
    attempt = ex.attempt + 1
    started = now if attempt == 1 else (ex._attempt_started or now)
    name = step.name
    hooks = ex.hooks
    if hooks is not None:
        await emit(ex, "on_step_started", name, attempt)
    fn = step.execute_fn
    try:
        if fn is not None:
            result = fn(ex.context)
            if result is not None:
                if type(result) is SagaContext:
                    # The common case (the step returned its context): skip the awaitable checks,
                    # whose ABC instance check costs more than the rest of this block.
                    ex.context = result
                else:
                    if type(result) is CoroutineType or inspect.isawaitable(result):
                        result = await result
                    take_result(ex, result)
    except SagaContextError as exc:
        raise context_error(exc, name) from None
    except Exception as exc:
        ex._restore_context()
        error = exception_error(name, exc)
        if hooks is not None:
            await emit(ex, "on_step_failed", name, attempt, error)
        if step.retry.allows(attempt):
            ex.attempt = attempt
            ex._attempt_started = started
            return Transition(ex.status, persist=False, retry_after=step.retry.delay(attempt), step=name)
        ex.attempt = 0
        new_record(ex, step, "execute", "failed", attempt, started, error=error)
        log_exhausted(ex, name, "execute", attempt, error)
        return await begin_compensation(ex, error)
    ex.attempt = 0
    ex.steps.append(new_step_record(name, "local", "execute", "succeeded", attempt, started, ex._clock()))
    if hooks is not None:
        await emit(ex, "on_step_completed", name, attempt)
    return await step_done(ex, name, True)


async def send_remote(ex: SagaExecution, step: RemoteSagaStep, now: datetime) -> Transition:
    """Build the step's command and pause for its reply (a failing ``on_execute`` compensates)."""
    if ex.hooks is not None:
        await emit(ex, "on_step_started", step.name, 1)
    assert step.execute_fn is not None
    try:
        request = as_request(await invoke(step.execute_fn, ex.context), step.name)
        awaiting, message = new_request(ex, step, request, "execute", now, 1, len(ex.steps), tuple(ex.cursor))
    except SagaContextError as exc:
        raise context_error(exc, step.name) from None
    except Exception as exc:
        ex._restore_context()
        error = exception_error(step.name, exc)
        new_record(ex, step, "execute", "failed", 1, now, error=error)
        if ex.hooks is not None:
            await emit(ex, "on_step_failed", step.name, 1, error)
        return await begin_compensation(ex, error)
    new_record(ex, step, "execute", "waiting", 1, now, request_id=awaiting.request_id)
    ex.awaiting = awaiting
    await set_status(ex, _PAUSED)
    return Transition(_PAUSED, (message,), step=step.name)


async def step_replied(
    ex: SagaExecution,
    awaiting: AwaitedRequest,
    status: SagaResponseStatus,
    response: SagaResponse,
    now: datetime,
) -> Transition:
    """Apply the reply to a forward remote step."""
    step = ex.step_at(awaiting.path)
    assert isinstance(step, RemoteSagaStep)
    attempt = awaiting.attempt
    if status is SagaResponseStatus.SYSTEM_ERROR:
        error = reply_error(step.name, response)
        if ex.hooks is not None:
            await emit(ex, "on_step_failed", step.name, attempt, error)
        if step.retry.allows(attempt):
            return await resend(ex, step, awaiting, now)
        update_record(ex, awaiting.record, "failed", error=error)
        return await begin_compensation(ex, error)
    handler = step.success_fn if status is SagaResponseStatus.SUCCESS else step.error_fn
    if status is SagaResponseStatus.ERROR and handler is None:
        error = reply_error(step.name, response)
        update_record(ex, awaiting.record, "failed", error=error)
        if ex.hooks is not None:
            await emit(ex, "on_step_failed", step.name, attempt, error)
        return await begin_compensation(ex, error)
    try:
        if handler is not None:
            take_result(ex, await invoke(handler, ex.context, response))
    except SagaContextError as exc:
        raise context_error(exc, step.name) from None
    except Exception as exc:
        ex._restore_context()
        error = exception_error(step.name, exc)
        update_record(ex, awaiting.record, "failed", error=error)
        if ex.hooks is not None:
            await emit(ex, "on_step_failed", step.name, attempt, error)
        if status is SagaResponseStatus.SUCCESS:
            # The participant did its part; its compensation must undo it.
            ex.executed.append(awaiting.path)
        return await begin_compensation(ex, error)
    if status is SagaResponseStatus.SUCCESS:
        update_record(ex, awaiting.record, "succeeded")
    else:
        # on_error handled the refusal: the saga goes on, and there is nothing to compensate at this step.
        update_record(ex, awaiting.record, "succeeded", error=reply_error(step.name, response))
    if ex.hooks is not None:
        await emit(ex, "on_step_completed", step.name, attempt)
    # The cursor still points at the step that sent the request.
    return await step_done(ex, step.name, status is SagaResponseStatus.SUCCESS)


async def abandon_request(
    ex: SagaExecution, awaiting: AwaitedRequest, step: SagaStep, error: dict[str, Any]
) -> Transition:
    """Give up on a forward request (timeout, deadline): compensate it too, since it may have run."""
    ex.awaiting = None
    update_record(ex, awaiting.record, "failed", error=error)
    if ex.hooks is not None:
        await emit(ex, "on_step_failed", step.name, awaiting.attempt, error)
    ex.executed.append(awaiting.path)
    return await begin_compensation(ex, error)


async def finish(ex: SagaExecution, step: str | None) -> Transition:
    """Every step ran: FINISHED, with commit for the participants when autocommitting."""
    await set_status(ex, _FINISHED)
    outbox = ex._decision("commit") if ex.autocommit else ()
    return Transition(_FINISHED, outbox, step=step) if outbox else moved(_FINISHED, step)


async def cancel(ex: SagaExecution, error: dict[str, Any]) -> Transition:
    """Stop going forward and compensate what ran, through the same path as a failed step.

    An awaited forward request is abandoned like a timed-out one (it is compensated too, since its
    participant may have run it); otherwise the executed steps are compensated in reverse.

    Raises:
        SagaStateError: The run ended (FINISHED, ERRORED) or is already compensating.
    """
    if ex.status in (SagaStatus.FINISHED, SagaStatus.ERRORED) or ex.phase == "compensate":
        raise SagaStateError(
            f"cannot cancel execution {ex.id}: it is {ex.status}"
            + (" and compensating" if ex.phase == "compensate" and not ex.terminal else ""),
            execution_id=ex.id,
        )
    awaiting = ex.awaiting
    if awaiting is not None:
        return await abandon_request(ex, awaiting, ex.step_at(awaiting.path), error)
    return await begin_compensation(ex, error)
