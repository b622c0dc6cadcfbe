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
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from saga import compensation as _comp
from saga.context import SagaContext
from saga.definitions import Saga
from saga.errors import (
    SagaDefinitionError,
    SagaExecutionAlreadyExecutedException,
    SagaExecutionError,
    SagaPausedExecutionStepException,
    SagaRollbackExecutionException,
)
from saga.messages import AWAITED_REQUEST_ID, SagaResponse
from saga.state import Transition
from saga.steps import not_a_saga
from storage import SagaStatus

if TYPE_CHECKING:
    from saga.execution import SagaExecution

__all__ = ["MinosExecutionAPI"]

_ROLLED_BACK: dict[str, Any] = {"step": None, "error": "rolled back", "type": "rollback"}


class MinosExecutionAPI:
    """`saga.SagaExecution`'s Minos methods: build a run with `from_definition`, drive it in this
    process with `execute` and `rollback`."""

    __slots__ = ()

    @classmethod
    def from_definition(
        cls,
        definition: Saga,
        context: SagaContext | Mapping[str, Any] | None = None,
        uuid: uuid.UUID | None = None,
        *,
        user: str | None = None,
        reply_topic: str = "sagaReply",
    ) -> SagaExecution:
        """A new run to drive in this process with `execute` / `rollback` (Minos's constructor).

        Raises:
            SagaDefinitionError: Not a saga, or an invalid or uncommitted one (Minos's ``validate``).
        """
        if not isinstance(definition, Saga):
            raise SagaDefinitionError(f"from_definition needs a Saga, got {not_a_saga(definition)}")
        definition.validate()
        if definition.name is None:
            definition._set_name(definition.derived_name())
        start = cast("type[SagaExecution]", cls).start
        now = datetime.now(UTC)
        return start(definition, context, reply_topic=reply_topic, now=now, user=user, execution_id=uuid)

    async def execute(self, response: SagaResponse | None = None, *, autocommit: bool = True) -> SagaContext:
        """Run in this process until a remote step pauses the run or it ends (Minos's ``execute``).

        Commands and decisions go to ``outbox``; ``execute(response=...)`` applies the reply (one built
        without a request id answers the awaited request) and goes on.

        Raises:
            SagaPausedExecutionStepException: A remote step waits for its reply.
            SagaExecutionError: The run ended ERRORED or DEAD_LETTER (Minos's
                ``SagaFailedExecutionException``).
            SagaExecutionAlreadyExecutedException: The run already ended, or the reply answers nothing.
        """
        return await execute(cast("SagaExecution", self), response, autocommit=autocommit)

    async def rollback(self, *, autoreject: bool = True) -> None:
        """Compensate the steps that ran, in reverse (Minos's ``rollback``); commands go to ``outbox``.

        Raises:
            SagaRollbackExecutionException: Already rolled back, or a compensation failed for good.
        """
        await rollback(cast("SagaExecution", self), autoreject=autoreject)

    def correlate(self, response: SagaResponse) -> SagaResponse:
        """``response`` as the reply to the awaited request when it carries no request id of its own."""
        return correlate(cast("SagaExecution", self), response)


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
