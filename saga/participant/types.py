"""What a participant's handlers receive and return, and what the participant counts.

Plain data and signatures, kept apart from `SagaParticipant` so that module stays about consuming,
replying and dead-lettering.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from saga.errors import SagaStateError
from saga.messages import SagaControl

__all__ = ["CommandContext", "CommandHandler", "DecisionHandler", "HandlerTransaction", "ParticipantStats"]


class HandlerTransaction:
    """The participant database's transaction a transactional handler runs in.

    The participant opens it, and commits it together with the command's dedup record and its reply once
    the handler returned (or rolls it back when the handler raised). The handler writes through
    `connection` (SQLAlchemy Core) or `session` (the ORM, joined to the same transaction); it never
    commits itself.
    """

    __slots__ = ("_session", "connection")

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection
        self._session: AsyncSession | None = None

    @property
    def session(self) -> AsyncSession:
        """An `AsyncSession` joined to the transaction, made on first use and flushed before the commit."""
        if self._session is None:
            self._session = AsyncSession(
                bind=self.connection, expire_on_commit=False, join_transaction_mode="rollback_only"
            )
        return self._session

    async def flush(self) -> None:
        """Flush and close the session, if the handler used one (its writes join the transaction)."""
        session, self._session = self._session, None
        if session is not None:
            try:
                await session.flush()
            finally:
                await session.close()

    async def discard(self) -> None:
        """Close the session without flushing (the transaction is being rolled back)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()


@dataclass(frozen=True, slots=True)
class CommandContext:
    """What a command handler receives.

    Attributes:
        content: The command's JSON payload.
        user: The user the saga runs for, if any.
        idempotency_key: Same for every delivery and replay of this request. At-least-once handlers
            (those calling the outside world) pass it on so the outside world can drop duplicates.
        execution_id: The saga execution that sent the command.
        request_id: The request the reply answers.
        topic: The command topic.
        saga: Saga definition name (informational).
        step: Step name; with the execution id it pairs a compensation with its forward command.
        traceparent: W3C trace context of the saga, when it sent one.
        tracestate: W3C vendor trace state, when it sent one.
        transaction: The participant database's transaction of a transactional handler (else ``None``).
    """

    content: Any
    user: str | None
    idempotency_key: str
    execution_id: uuid.UUID
    request_id: uuid.UUID
    topic: str
    saga: str | None = None
    step: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    transaction: HandlerTransaction | None = None

    @property
    def connection(self) -> AsyncConnection:
        """The `AsyncConnection` of the handler's transaction (transactional handlers only)."""
        return self._transaction().connection

    @property
    def session(self) -> AsyncSession:
        """An `AsyncSession` in the handler's transaction (transactional handlers only)."""
        return self._transaction().session

    def _transaction(self) -> HandlerTransaction:
        if self.transaction is None:
            raise SagaStateError(
                f"the handler of {self.topic!r} runs without a participant database transaction: give the "
                "participant a store and register the handler transactional"
            )
        return self.transaction


#: A command handler: ``fn(request) -> content``, sync or async.
CommandHandler = Callable[[CommandContext], Any]
#: A decision handler: ``fn(control) -> None``, sync or async.
DecisionHandler = Callable[[SagaControl], Any]


@dataclass(slots=True)
class ParticipantStats:
    """Counters of what the participant did since it was built.

    Attributes:
        handled: Commands whose handler ran.
        succeeded: Of those, replied ``SUCCESS`` (200).
        business_errors: Replied ``ERROR`` (400): the handler raised `SagaBusinessError`.
        system_errors: Replied ``SYSTEM_ERROR`` (500): the handler raised anything else.
        duplicates: Commands answered with the stored reply, without running the handler.
        commits: ``commit`` decisions handled.
        rejects: ``reject`` decisions handled.
        duplicate_decisions: Decisions already handled, skipped.
        dead_lettered: Records forwarded to the dead-letter topic.
        dead_letter_reasons: Dead letters by reason category (``malformed``, ``no_handler``, ...).
        retries: Retriable broker/storage failures that were backed off and retried.
        waited: Commands another instance held a claim on when they arrived here (answered once it ended,
            or taken over when its lease ran out).
        lost_claims: Handlers whose claim another instance took over (lease expired); their transaction
            was rolled back and the other instance answers.
        tombstones: Compensations that arrived before their forward command took effect (nothing undone).
        cancelled: Forward commands refused with ``cancelled`` because their compensation came first.
        oversized_replies: Replies over the size limit, answered with a small ``SYSTEM_ERROR`` instead.
    """

    handled: int = 0
    succeeded: int = 0
    business_errors: int = 0
    system_errors: int = 0
    duplicates: int = 0
    commits: int = 0
    rejects: int = 0
    duplicate_decisions: int = 0
    dead_lettered: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    waited: int = 0
    lost_claims: int = 0
    tombstones: int = 0
    cancelled: int = 0
    oversized_replies: int = 0
