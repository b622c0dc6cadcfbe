"""Helpers shared by the forward (`saga.execution_steps`) and backward (`saga.compensation`) step logic.

They mutate a `SagaExecution` in place: status changes with their hooks, step-history records, the cursor,
and new requests with their outbox rows.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from saga.context import SagaContext
from saga.errors import SagaContextError
from saga.hooks import HookName, SagaEvent, call_hook
from saga.messages import SagaRequest, SagaResponse
from saga.retry import RetryPolicy
from saga.state import AwaitedRequest, Transition, moved, outbox_message, random_uuid
from saga.steps import ConditionalSagaStep, LocalSagaStep, RemoteSagaStep, SagaStep
from saga.trace_context import new_traceparent
from storage import OutboxMessage, SagaStatus
from storage.records import StepPhase, StepState, new_step_record

if TYPE_CHECKING:
    from saga.execution import SagaExecution

__all__: list[str] = []

#: Error type of a step whose command the broker refused for good (never published).
PUBLISH_REJECTED = "publish_rejected"

ActionStep = LocalSagaStep | RemoteSagaStep

_log = logging.getLogger("saga.execution")

_RUNNING = SagaStatus.RUNNING
_PAUSED = SagaStatus.PAUSED
_DEAD_LETTER = SagaStatus.DEAD_LETTER


# -- small helpers -------------------------------------------------------------------------------------


async def set_status(ex: SagaExecution, status: SagaStatus) -> None:
    """Change the status, telling the hooks."""
    previous = ex.status
    if previous is status:
        return
    ex.status = status
    if status is _DEAD_LETTER:
        error = ex.error or {}
        _log.warning(
            "execution %s (%s) moved to DEAD_LETTER: %s",
            ex.id,
            ex.name,
            "; ".join(
                f"{label}{error[key]}"
                for key, label in (("error", ""), ("compensation_error", "compensation: "))
                if error.get(key)
            )
            or error.get("type"),
            extra={"execution_id": str(ex.id), "saga": ex.name, "step": error.get("step")},
        )
    hooks = ex.hooks
    if hooks is None:
        return
    if hooks.on_status_changed is not None:
        took = None
        created = ex.created_at
        if created is not None and status in _ENDED:
            took = (ex._clock() - created).total_seconds()
        await call_hook(
            hooks.on_status_changed,
            SagaEvent(
                "on_status_changed", ex.id, ex.name, status=status, previous_status=previous, duration=took
            ),
        )
    if status is _DEAD_LETTER and hooks.on_dead_lettered is not None:
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
        took = _step_duration(ex, hook, step)
        await call_hook(
            fn, SagaEvent(hook, ex.id, ex.name, step, ex.status, attempt=attempt, error=error, duration=took)
        )


async def announce_start(ex: SagaExecution) -> None:
    """Call ``on_execution_started`` for a new execution, once it is stored."""
    hooks = ex.hooks
    if hooks is not None and hooks.on_execution_started is not None:
        await call_hook(
            hooks.on_execution_started, SagaEvent("on_execution_started", ex.id, ex.name, status=ex.status)
        )


_ENDED = frozenset((SagaStatus.FINISHED, SagaStatus.ERRORED, SagaStatus.DEAD_LETTER))
_PHASE_OF: dict[str, StepPhase] = {
    "on_step_completed": "execute",
    "on_step_failed": "execute",
    "on_compensation_completed": "compensate",
    "on_compensation_failed": "compensate",
}


def _step_duration(ex: SagaExecution, hook: HookName, step: str) -> float | None:
    """How long the step's latest record ran, for the hooks that end one (``None`` if it has not ended)."""
    phase = _PHASE_OF.get(hook)
    if phase is None:
        return None
    for record in reversed(ex.steps):
        if record.name == step and record.phase == phase:
            end = record.finished_at
            return None if end is None else (end - record.started_at).total_seconds()
    return None


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
    """Structured error of a non-200 reply.

    The orchestrator's own 500 for a command the broker refused (``publish_rejected``, see
    `saga.relay.rejection_error`) keeps that shape: type, reason, size and limit.
    """
    status = int(response.status)
    content = response.content
    if (
        response.service_name is None
        and isinstance(content, dict)
        and content.get("type") == PUBLISH_REJECTED
    ):
        return {"step": step, "status": status, **content}
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
    """Append a step-history record (``waiting`` ones have no finish time yet)."""
    finished = None if status == "waiting" else ex._clock()
    ex.steps.append(
        new_step_record(
            step.name, step.kind, phase, status, attempts, started_at, finished, request_id, error
        )
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
    """Replace history record ``index`` with a new status (records are immutable)."""
    old = ex.steps[index]
    ex.steps[index] = new_step_record(
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


def log_exhausted(ex: SagaExecution, step: str, phase: str, attempts: int, error: Mapping[str, Any]) -> None:
    """WARNING: a step or compensation failed its last allowed attempt (only when it had retries)."""
    if attempts > 1:
        _log.warning(
            "execution %s (%s): %s %s failed after %d attempts: %s",
            ex.id,
            ex.name,
            "compensation of" if phase == "compensate" else "step",
            step,
            attempts,
            error.get("error") or error.get("type"),
            extra={"execution_id": str(ex.id), "saga": ex.name, "step": step},
        )


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
    delay: float | None = None,
) -> tuple[AwaitedRequest, OutboxMessage]:
    """A fresh request (new id and idempotency key) and its outbox row.

    A run without a trace context (started without the manager, or stored without one) starts a trace
    here; it is saved with the request, so the run's later commands carry the same one. With ``delay`` (a
    retry's backoff) the row is due that many seconds later and the reply's timeout counts from then.
    """
    if ex.traceparent is None:
        ex.traceparent = new_traceparent()
    request_id = random_uuid()
    timeout = step.timeout
    if delay is not None and timeout is not None:
        timeout += delay
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
        execution_id=ex.id,
        reply_topic=ex.reply_topic,
        user=ex.user,
        saga=ex.name,
        step=step.name,
        traceparent=ex.traceparent,
        tracestate=ex.tracestate,
    )
    return awaiting, outbox_message(command, delay=delay)


def as_request(value: Any, step: str) -> SagaRequest:
    """Check a callback returned a `SagaRequest` (a ``TypeError`` is a step failure)."""
    if not isinstance(value, SagaRequest):
        raise TypeError(f"step {step!r} returned {type(value).__name__}; expected a SagaRequest")
    return value


_RUNNING_AFTER: dict[str, Transition] = {}


def running(step: str) -> Transition:
    """The (shared, immutable) transition "step done, still RUNNING": `moved`, keyed by the name alone."""
    transition = _RUNNING_AFTER.get(step)
    if transition is None:
        transition = _RUNNING_AFTER[step] = moved(_RUNNING, step)
    return transition


async def resend(
    ex: SagaExecution, step: RemoteSagaStep, awaiting: AwaitedRequest, now: datetime
) -> Transition:
    """Answer a failed reply with a new request (new id and key) for the same step or compensation.

    The new command waits out the retry policy's delay before it is published: its outbox row is due
    then (on the database's clock, so a restart in between keeps the schedule).
    """
    request = SagaRequest(awaiting.target, awaiting.content)
    policy = step.retry if awaiting.phase == "execute" else compensation_policy(ex, step)
    delay = policy.delay(awaiting.attempt) or None
    new, message = new_request(
        ex, step, request, awaiting.phase, now, awaiting.attempt + 1, awaiting.record, awaiting.path, delay
    )
    update_record(ex, awaiting.record, "waiting", attempts=new.attempt, request_id=new.request_id)
    ex.awaiting = new
    await set_status(ex, _PAUSED)
    return Transition(_PAUSED, (message,), step=step.name)
