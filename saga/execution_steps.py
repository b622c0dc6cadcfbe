"""The step logic of `SagaExecution`: running, replying, compensating, finishing.

Split from `saga.execution` to keep each module readable; these functions are the execution's private
methods and mutate it in place. Rules they implement:

* one call runs one step (conditions are decided inline and do not count as a step);
* a failed callback leaves the context as it was last stored (no half-applied changes);
* a step is compensated only if it did something: a local step that returned, a remote step whose
  participant replied 200, or one whose reply never came (it may have run);
* a compensation that keeps failing puts the run in DEAD_LETTER, with the original error kept as ``cause``.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from saga.context import SagaContext
from saga.errors import SagaContextError
from saga.hooks import HookName, SagaEvent, call_hook
from saga.messages import SagaRequest, SagaResponse, SagaResponseStatus
from saga.retry import RetryPolicy
from saga.state import AwaitedRequest, Transition, exception_error, outbox_message
from saga.steps import ConditionalSagaStep, LocalSagaStep, RemoteSagaStep, SagaStep, invoke
from storage import OutboxMessage, SagaStatus, StepRecord
from storage.records import StepPhase, StepState

if TYPE_CHECKING:
    from saga.execution import SagaExecution

__all__: list[str] = []

ActionStep = LocalSagaStep | RemoteSagaStep


# -- small helpers -------------------------------------------------------------------------------------


async def set_status(ex: SagaExecution, status: SagaStatus) -> None:
    """Change the status, telling the hooks."""
    previous = ex.status
    if previous is status:
        return
    ex.status = status
    hooks = ex.hooks
    if hooks is None:
        return
    if hooks.on_status_changed is not None:
        await call_hook(
            hooks.on_status_changed,
            SagaEvent("on_status_changed", ex.id, ex.name, status=status, previous_status=previous),
        )
    if status is SagaStatus.DEAD_LETTER and hooks.on_dead_lettered is not None:
        await call_hook(
            hooks.on_dead_lettered,
            SagaEvent("on_dead_lettered", ex.id, ex.name, status=status, error=ex.error),
        )


async def emit(
    ex: SagaExecution, hook: HookName, step: str, attempt: int, error: Mapping[str, Any] | None = None
) -> None:
    """Call one step hook if set (callers check ``ex.hooks`` for ``None`` first)."""
    fn = getattr(ex.hooks, hook, None)
    if fn is not None:
        await call_hook(fn, SagaEvent(hook, ex.id, ex.name, step, ex.status, attempt=attempt, error=error))


def take_result(ex: SagaExecution, result: Any) -> None:
    """Adopt what a context-returning callback returned (``None`` keeps the context)."""
    if result is None:
        return
    if type(result) is SagaContext:
        ex.context = result
    elif isinstance(result, Mapping):
        ex.context = SagaContext(result)
    else:
        raise TypeError(
            f"step callback returned {type(result).__name__}; expected a context, a mapping or None"
        )


def context_error(exc: SagaContextError, step: str) -> SagaContextError:
    """Name the step in a context error raised inside it."""
    if exc.step is None:
        exc.step = step
        exc.args = (f"{exc.args[0]} (set in step {step!r})",) if exc.args else exc.args
    return exc


def reply_error(step: str, response: SagaResponse) -> dict[str, Any]:
    """Structured error of a non-200 reply."""
    status = int(response.status)
    return {
        "step": step,
        "error": f"participant {response.service_name or '?'} replied {status}",
        "type": "reply",
        "status": status,
        "reply": response.content,
    }


def new_record(
    ex: SagaExecution,
    step: SagaStep,
    phase: StepPhase,
    status: StepState,
    attempts: int,
    started_at: datetime,
    *,
    request_id: uuid.UUID | None = None,
    error: Mapping[str, Any] | None = None,
) -> None:
    finished = None if status == "waiting" else ex._clock()
    ex.steps.append(
        StepRecord(step.name, step.kind, phase, status, attempts, started_at, finished, request_id, error)
    )


def update_record(
    ex: SagaExecution,
    index: int,
    status: StepState,
    *,
    attempts: int | None = None,
    request_id: uuid.UUID | None = None,
    error: Mapping[str, Any] | None = None,
) -> None:
    old = ex.steps[index]
    ex.steps[index] = StepRecord(
        old.name,
        old.kind,
        old.phase,
        status,
        old.attempts if attempts is None else attempts,
        old.started_at,
        None if status == "waiting" else ex._clock(),
        old.request_id if request_id is None else request_id,
        error,
    )


def move_next(ex: SagaExecution) -> None:
    """Point the cursor past the current step, leaving finished sub-sagas."""
    cursor = ex.cursor
    cursor[-1] += 1
    while len(cursor) > 1:
        parent = ex.step_at(cursor[:-2])
        assert isinstance(parent, ConditionalSagaStep)
        if cursor[-1] < len(parent.branch(cursor[-2])._steps):
            return
        del cursor[-2:]
        cursor[-1] += 1


def compensation_policy(ex: SagaExecution, step: ActionStep) -> RetryPolicy:
    """The step's compensation retry policy, else the saga's."""
    return step.compensation_retry or ex.definition.compensation_retry


def new_request(
    ex: SagaExecution,
    step: RemoteSagaStep,
    request: SagaRequest,
    phase: StepPhase,
    now: datetime,
    attempt: int,
    record: int,
    path: tuple[int, ...],
) -> tuple[AwaitedRequest, OutboxMessage]:
    """A fresh request (new id and idempotency key) and its outbox row."""
    request_id = uuid.uuid4()
    timeout = step.timeout
    awaiting = AwaitedRequest(
        request_id=request_id,
        idempotency_key=str(request_id),
        path=path,
        phase=phase,
        target=request.target,
        content=request.content,
        attempt=attempt,
        deadline=None if timeout is None else now + timedelta(seconds=timeout),
        record=record,
    )
    command = awaiting.command(
        execution_id=ex.id, reply_topic=ex.reply_topic, user=ex.user, saga=ex.name, step=step.name
    )
    return awaiting, outbox_message(command)


def as_request(value: Any, step: str) -> SagaRequest:
    if not isinstance(value, SagaRequest):
        raise TypeError(f"step {step!r} returned {type(value).__name__}; expected a SagaRequest")
    return value


# -- forward -------------------------------------------------------------------------------------------


async def execute_next(ex: SagaExecution, now: datetime) -> Transition:
    """Run the step under the cursor (deciding conditionals on the way)."""
    top = ex.definition._steps
    while True:
        cursor = ex.cursor
        if len(cursor) == 1:
            if cursor[0] >= len(top):
                return await finish(ex, None)
            step = top[cursor[0]]
        else:
            step = ex.step_at(cursor)
        if type(step) is LocalSagaStep:
            return await run_local(ex, step, now)
        if type(step) is RemoteSagaStep:
            return await send_remote(ex, step, now)
        assert isinstance(step, ConditionalSagaStep)
        failed = await choose_branch(ex, step, now)
        if failed is not None:
            return failed


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


_RUNNING: dict[str, Transition] = {}


def running(step: str) -> Transition:
    """The (shared, immutable) transition "step done, still RUNNING": built once per step name."""
    transition = _RUNNING.get(step)
    if transition is None:
        transition = _RUNNING[step] = Transition(SagaStatus.RUNNING, step=step)
    return transition


async def step_done(ex: SagaExecution, step: SagaStep, compensable: bool) -> Transition:
    """A forward step completed: remember it for compensation, move the cursor on, maybe finish."""
    cursor = ex.cursor
    if len(cursor) == 1:  # top level: the common case, without the general walk
        index = cursor[0]
        if compensable:
            ex.executed.append((index,))
        cursor[0] = index + 1
        if index + 1 >= len(ex.definition._steps):
            return await finish(ex, step.name)
    else:
        if compensable:
            ex.executed.append(tuple(cursor))
        move_next(ex)
        if len(cursor) == 1 and cursor[0] >= len(ex.definition._steps):
            return await finish(ex, step.name)
    if ex.status is not SagaStatus.RUNNING:
        await set_status(ex, SagaStatus.RUNNING)
    return running(step.name)


async def run_local(ex: SagaExecution, step: LocalSagaStep, now: datetime) -> Transition:
    attempt = ex.attempt + 1
    started = now if attempt == 1 else (ex._attempt_started or now)
    hooks = ex.hooks
    if hooks is not None:
        await emit(ex, "on_step_started", step.name, attempt)
    fn = step.execute_fn
    try:
        if fn is not None:
            result = fn(ex.context)
            if result is not None:
                if type(result) is CoroutineType or inspect.isawaitable(result):
                    result = await result
                take_result(ex, result)
    except SagaContextError as exc:
        raise context_error(exc, step.name) from None
    except Exception as exc:
        ex._restore_context()
        error = exception_error(step.name, exc)
        if hooks is not None:
            await emit(ex, "on_step_failed", step.name, attempt, error)
        if step.retry.allows(attempt):
            ex.attempt = attempt
            ex._attempt_started = started
            return Transition(ex.status, persist=False, retry_after=step.retry.delay(attempt), step=step.name)
        ex.attempt = 0
        new_record(ex, step, "execute", "failed", attempt, started, error=error)
        return await begin_compensation(ex, error)
    ex.attempt = 0
    ex.steps.append(StepRecord(step.name, "local", "execute", "succeeded", attempt, started, ex._clock()))
    if hooks is not None:
        await emit(ex, "on_step_completed", step.name, attempt)
    return await step_done(ex, step, True)


async def send_remote(ex: SagaExecution, step: RemoteSagaStep, now: datetime) -> Transition:
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
    await set_status(ex, SagaStatus.PAUSED)
    return Transition(SagaStatus.PAUSED, (message,), step=step.name)


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
    return await step_done(ex, step, status is SagaResponseStatus.SUCCESS)


async def resend(
    ex: SagaExecution, step: RemoteSagaStep, awaiting: AwaitedRequest, now: datetime
) -> Transition:
    """Answer a failed reply with a new request (new id and key) for the same step or compensation."""
    request = SagaRequest(awaiting.target, awaiting.content)
    new, message = new_request(
        ex, step, request, awaiting.phase, now, awaiting.attempt + 1, awaiting.record, awaiting.path
    )
    update_record(ex, awaiting.record, "waiting", attempts=new.attempt, request_id=new.request_id)
    ex.awaiting = new
    await set_status(ex, SagaStatus.PAUSED)
    return Transition(SagaStatus.PAUSED, (message,), step=step.name)


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
    await set_status(ex, SagaStatus.FINISHED)
    outbox = ex._decision("commit") if ex.autocommit else ()
    return Transition(SagaStatus.FINISHED, outbox, step=step)


# -- compensation --------------------------------------------------------------------------------------


async def begin_compensation(ex: SagaExecution, error: dict[str, Any]) -> Transition:
    """Switch to compensating the executed steps in reverse (or end ERRORED when there are none)."""
    ex.error = error
    ex.phase = "compensate"
    ex.compensated = 0
    ex.attempt = 0
    ex.awaiting = None
    if next_compensation(ex) is None:
        return await end_compensation(ex, error.get("step"))
    await set_status(ex, SagaStatus.COMPENSATING)
    return Transition(SagaStatus.COMPENSATING, step=error.get("step"))


def next_compensation(ex: SagaExecution) -> ActionStep | None:
    """The next executed step that has a compensation, skipping those without one."""
    while ex.compensated < len(ex.executed):
        step = ex.step_at(ex.executed[-1 - ex.compensated])
        if isinstance(step, LocalSagaStep | RemoteSagaStep) and step.failure_fn is not None:
            return step
        ex.compensated += 1
    return None


async def end_compensation(ex: SagaExecution, step: str | None) -> Transition:
    error = ex.error
    if error is not None and "cause" in error:
        ex.error = dict(error["cause"])  # a retried DEAD_LETTER finished compensating
    await set_status(ex, SagaStatus.ERRORED)
    outbox = ex._decision("reject") if ex.autocommit else ()
    return Transition(SagaStatus.ERRORED, outbox, step=step)


async def compensation_done(ex: SagaExecution, step: ActionStep) -> Transition:
    ex.compensated += 1
    ex.attempt = 0
    if ex.hooks is not None:
        await emit(ex, "on_compensation_completed", step.name, 1)
    if next_compensation(ex) is None:
        return await end_compensation(ex, step.name)
    await set_status(ex, SagaStatus.COMPENSATING)
    return Transition(SagaStatus.COMPENSATING, step=step.name)


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
            return await compensation_done(ex, step)
        if result is None:
            new_record(ex, step, "compensate", "skipped", attempt, started)
            return await compensation_done(ex, step)
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
        return await dead_letter(ex, step.name, error)
    new_record(ex, step, "compensate", "waiting", attempt, started, request_id=awaiting.request_id)
    ex.awaiting = awaiting
    await set_status(ex, SagaStatus.PAUSED)
    return Transition(SagaStatus.PAUSED, (message,), step=step.name)


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
        return await compensation_done(ex, step)
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
    await set_status(ex, SagaStatus.DEAD_LETTER)
    return Transition(SagaStatus.DEAD_LETTER, step=step)


async def compensation_timed_out(
    ex: SagaExecution, awaiting: AwaitedRequest, step: ActionStep, error: dict[str, Any]
) -> Transition:
    update_record(ex, awaiting.record, "failed", error=error)
    if ex.hooks is not None:
        await emit(ex, "on_compensation_failed", step.name, awaiting.attempt, error)
    return await dead_letter(ex, step.name, error)
