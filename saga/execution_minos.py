"""Minos's ``SagaExecution`` driving API over the I/O-free state machine: ``execute`` and ``rollback``.

Minos lets a caller drive an execution in its own process: ``execute()`` runs steps until a remote step
pauses it (`SagaPausedExecutionStepException`), ``execute(response=...)`` goes on with the reply, and
``rollback()`` compensates what ran. The state machine already does each move; these functions loop over
them, collect the commands and decisions in ``ex.outbox`` for the caller to publish (nothing here touches
a broker or a database) and raise Minos's exceptions where Minos raises them. A `SagaManager` is what
persists and publishes; this API is for tests and in-process use, as in Minos.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from saga import compensation as _comp
from saga.context import SagaContext
from saga.errors import (
    SagaExecutionAlreadyExecutedException,
    SagaExecutionError,
    SagaPausedExecutionStepException,
    SagaRollbackExecutionException,
)
from saga.messages import AWAITED_REQUEST_ID, SagaResponse
from saga.state import Transition
from storage import SagaStatus

if TYPE_CHECKING:
    from saga.execution import SagaExecution

__all__: list[str] = []

_ROLLED_BACK: dict[str, Any] = {"step": None, "error": "rolled back", "type": "rollback"}


def correlate(ex: SagaExecution, response: SagaResponse) -> SagaResponse:
    """``response`` as the reply to the awaited request, when it was built without a request id."""
    awaiting = ex.awaiting
    if response.request_id != AWAITED_REQUEST_ID or awaiting is None:
        return response
    return SagaResponse(
        content=response.content,
        status=response.status,
        execution_id=ex.id,
        request_id=awaiting.request_id,
        service_name=response.service_name,
    )


async def execute(ex: SagaExecution, response: SagaResponse | None, *, autocommit: bool) -> SagaContext:
    """Run until the execution pauses (raises) or ends (returns the context, or raises if it failed)."""
    status = ex.status
    if status is SagaStatus.FINISHED or status is SagaStatus.DEAD_LETTER:
        raise SagaExecutionAlreadyExecutedException(
            f"execution {ex.id} cannot be executed: it is {status}", execution_id=ex.id
        )
    if status is SagaStatus.ERRORED:
        if response is None:
            raise SagaExecutionAlreadyExecutedException(
                f"execution {ex.id} cannot be executed: it is {status}", execution_id=ex.id
            )
        return ex.context  # a late reply to a failed run changes nothing, as in Minos
    ex.autocommit = autocommit
    if response is not None:
        if ex.awaiting is None:
            raise SagaExecutionAlreadyExecutedException(
                f"execution {ex.id} awaits no reply", execution_id=ex.id
            )
        transition = await ex.apply_reply(correlate(ex, response), ex._clock())
        if transition.outcome != "applied":
            raise SagaExecutionAlreadyExecutedException(
                f"the reply does not answer the request execution {ex.id} awaits ({transition.outcome})",
                execution_id=ex.id,
            )
        _collect(ex, transition)
    await _drive(ex)
    if ex.awaiting is not None:
        raise SagaPausedExecutionStepException(
            f"execution {ex.id} waits for the reply to step {ex.step_at(ex.awaiting.path).name!r}",
            execution_id=ex.id,
        )
    if ex.status is SagaStatus.FINISHED:
        return ex.context
    error: dict[str, Any] = dict(ex.error or {})
    raise SagaExecutionError(
        f"saga {ex.name!r} execution {ex.id} ended {ex.status}: {error.get('error')}",
        execution_id=ex.id,
        step=error.get("step"),
        status=str(ex.status),
        error=error,
    )


async def rollback(ex: SagaExecution, *, autoreject: bool) -> None:
    """Compensate the steps that ran, in reverse, up to the end or the next remote compensation."""
    if ex.phase == "compensate" or ex.status in (SagaStatus.ERRORED, SagaStatus.DEAD_LETTER):
        raise SagaRollbackExecutionException(
            f"execution {ex.id} was already rolled back ({ex.status})", execution_id=ex.id
        )
    ex.autocommit = autoreject
    ex.decision_sent = False
    _collect(ex, await _comp.begin_compensation(ex, dict(_ROLLED_BACK)))
    await _drive(ex)
    if _status(ex) is SagaStatus.DEAD_LETTER:
        raise SagaRollbackExecutionException(
            f"execution {ex.id} failed during its rollback: {(ex.error or {}).get('error')}",
            execution_id=ex.id,
        )


async def _drive(ex: SagaExecution) -> None:
    while ex.awaiting is None and not ex.terminal:
        transition = await ex.advance(ex._clock())
        if transition.retry_after is not None:
            await asyncio.sleep(transition.retry_after)
        _collect(ex, transition)


def _status(ex: SagaExecution) -> SagaStatus:
    """The status now (read through a call: the moves awaited above change it)."""
    return ex.status


def _collect(ex: SagaExecution, transition: Transition) -> None:
    if transition.outbox:
        ex.outbox = (*ex.outbox, *transition.outbox)
