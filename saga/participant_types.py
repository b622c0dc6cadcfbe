"""What a participant's handlers receive and return, and what the participant counts.

Plain data and signatures, kept apart from `SagaParticipant` so that module stays about consuming,
replying and dead-lettering.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from saga.messages import SagaControl

__all__ = ["CommandContext", "CommandHandler", "DecisionHandler", "ParticipantStats"]


@dataclass(frozen=True, slots=True)
class CommandContext:
    """What a command handler receives.

    Attributes:
        content: The command's JSON payload.
        user: The user the saga runs for, if any.
        idempotency_key: Same for every delivery and replay of this request.
        execution_id: The saga execution that sent the command.
        request_id: The request the reply answers.
        topic: The command topic.
        saga: Saga definition name (informational).
        step: Step name (informational).
        traceparent: W3C trace context of the saga, when it sent one.
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
