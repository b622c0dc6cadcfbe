"""Lifecycle hooks: let applications observe executions (metrics, tracing, alerts) without touching them.

Every hook receives one `SagaEvent`. Hooks may be sync or async. A hook that raises is logged and ignored:
observing a saga must never change what the saga does.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from storage import SagaStatus

__all__ = ["HookName", "SagaEvent", "SagaHook", "SagaHooks", "call_hook"]

_log = logging.getLogger(__name__)

HookName = Literal[
    "on_execution_started",
    "on_step_started",
    "on_step_completed",
    "on_step_failed",
    "on_compensation_started",
    "on_compensation_completed",
    "on_compensation_failed",
    "on_status_changed",
    "on_dead_lettered",
]


@dataclass(frozen=True, slots=True)
class SagaEvent:
    """What happened to an execution.

    Attributes:
        hook: Which hook this event is for.
        execution_id: The execution.
        saga: Definition name.
        step: Step concerned (``None`` for status changes not tied to a step).
        status: Execution status after the event.
        previous_status: For ``on_status_changed``: the status before.
        attempt: Try number of the step or compensation (1 for the first).
        error: Structured error for failures and dead-lettering.
        duration: Seconds the step or compensation took (completions and failures whose step record
            has ended), or the execution took (a status change that ends it), where known.
    """

    hook: HookName
    execution_id: uuid.UUID
    saga: str
    step: str | None = None
    status: SagaStatus | None = None
    previous_status: SagaStatus | None = None
    attempt: int | None = None
    error: Mapping[str, Any] | None = None
    duration: float | None = None


SagaHook = Callable[[SagaEvent], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class SagaHooks:
    """Optional callbacks invoked as executions progress; every field defaults to ``None`` (no call).

    Attributes:
        on_step_started: Before a step's ``on_execute`` runs (each attempt).
        on_step_completed: A step succeeded (local function returned, remote reply applied).
        on_step_failed: A step attempt failed (exception, error reply, timeout).
        on_compensation_started: Before a compensation runs (each attempt).
        on_compensation_completed: A compensation succeeded.
        on_compensation_failed: A compensation attempt failed.
        on_status_changed: The execution's status changed.
        on_execution_started: A new execution was stored (``status`` is its first one).
        on_dead_lettered: The execution went to ``DEAD_LETTER``.
    """

    on_step_started: SagaHook | None = None
    on_step_completed: SagaHook | None = None
    on_step_failed: SagaHook | None = None
    on_compensation_started: SagaHook | None = None
    on_compensation_completed: SagaHook | None = None
    on_compensation_failed: SagaHook | None = None
    on_status_changed: SagaHook | None = None
    on_dead_lettered: SagaHook | None = None
    on_execution_started: SagaHook | None = None


async def call_hook(hook: SagaHook, event: SagaEvent) -> None:
    """Run one hook, logging (never raising) whatever it raises."""
    try:
        result = hook(event)
        if inspect.isawaitable(result):
            await result
    except Exception:
        _log.exception(
            "saga hook %s failed for execution %s (step %s); ignored",
            event.hook,
            event.execution_id,
            event.step,
        )
