"""Pieces of an execution's durable state: the awaited request, the transition type, error shapes.

Kept apart from `saga.execution` so the state machine reads as logic, and so the encoding of the engine's
``state`` document (see `SagaExecution.to_record`) is defined in one place.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from saga.messages import H_TRACEPARENT, H_TRACESTATE, PHASE_COMPENSATION, PHASE_FORWARD, SagaCommand
from saga.observability import tracing as _tracing
from storage import OutboxMessage, SagaStatus
from storage.records import ReplyOutcome, StepPhase
from storage.status import TERMINAL_STATUSES

__all__ = [
    "AwaitedRequest",
    "Transition",
    "compact",
    "exception_error",
    "moved",
    "outbox_message",
    "random_uuid",
]

#: Version of the ``state`` document layout; bump it with a migration when the layout changes.
STATE_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Transition:
    """What one move of the state machine asks the caller (the manager) to do.

    Attributes:
        status: Execution status after the move.
        outbox: Commands and control messages to write with the state and publish once it is stored.
        persist: Whether the state changed and must be saved (``False`` for ignored replies and for
            retries waiting for their backoff).
        retry_after: Seconds to wait before calling ``advance`` again (a local retry with backoff).
        outcome: For replies: ``applied``, or why the reply was ignored.
        step: Name of the step the move concerned, when there is one.
    """

    status: SagaStatus
    outbox: tuple[OutboxMessage, ...] = ()
    persist: bool = True
    retry_after: float | None = None
    outcome: ReplyOutcome | None = None
    step: str | None = None

    @property
    def paused(self) -> bool:
        """The execution waits for a reply."""
        return self.status is SagaStatus.PAUSED

    @property
    def terminal(self) -> bool:
        """The execution reached FINISHED, ERRORED or DEAD_LETTER."""
        return self.status in TERMINAL_STATUSES


_MOVED: dict[tuple[SagaStatus, str | None], Transition] = {}


def moved(status: SagaStatus, step: str | None) -> Transition:
    """The transition "now in ``status``, nothing to send" (persisted), built once per status and step.

    Transitions are immutable and the driver only reads them, so the common moves share one object
    instead of building a frozen dataclass per step. Bounded by the statuses times the step names of the
    registered definitions.
    """
    transition = _MOVED.get((status, step))
    if transition is None:
        transition = _MOVED[status, step] = Transition(status, step=step)
    return transition


@dataclass(slots=True)
class AwaitedRequest:
    """The command whose reply the execution waits for; everything needed to replay it.

    Attributes:
        request_id: Only a reply carrying this id is applied.
        idempotency_key: Same on replays, so the participant can drop duplicates.
        path: Cursor path of the step that sent it.
        phase: ``execute`` or ``compensate``.
        target: Command topic.
        content: Command payload (JSON-able).
        attempt: Sends so far for this step/phase (replays and retries included).
        deadline: When the reply is overdue (``None``: no step timeout).
        record: Index in the step history of the record this request updates.
    """

    request_id: uuid.UUID
    idempotency_key: str
    path: tuple[int, ...]
    phase: StepPhase
    target: str
    content: Any
    attempt: int
    deadline: datetime | None
    record: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form for the state document."""
        return {
            "rid": str(self.request_id),
            "key": self.idempotency_key,
            "path": list(self.path),
            "phase": self.phase,
            "target": self.target,
            "content": self.content,
            "attempt": self.attempt,
            "deadline": None if self.deadline is None else self.deadline.isoformat(),
            "record": self.record,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AwaitedRequest:
        """Inverse of `to_json`."""
        deadline = data["deadline"]
        return cls(
            request_id=uuid.UUID(data["rid"]),
            idempotency_key=data["key"],
            path=tuple(data["path"]),
            phase=data["phase"],
            target=data["target"],
            content=data["content"],
            attempt=data["attempt"],
            deadline=None if deadline is None else datetime.fromisoformat(deadline),
            record=data["record"],
        )

    def command(
        self,
        *,
        execution_id: uuid.UUID,
        reply_topic: str,
        user: str | None,
        saga: str,
        step: str,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> SagaCommand:
        """The command to (re)send for this request, carrying the saga's trace context.

        With tracing on, the current span (the step's or the publish's) is the command's parent, so the
        participant's spans join the saga's trace under it; otherwise the execution's stored context is sent.
        """
        if _tracing.enabled:
            current = _tracing.trace_headers()
            if H_TRACEPARENT in current:
                traceparent, tracestate = current[H_TRACEPARENT], current.get(H_TRACESTATE)
        return SagaCommand(
            target=self.target,
            content=self.content,
            execution_id=execution_id,
            request_id=self.request_id,
            reply_topic=reply_topic,
            idempotency_key=self.idempotency_key,
            user=user,
            saga=saga,
            step=step,
            traceparent=traceparent,
            tracestate=tracestate,
            phase=PHASE_COMPENSATION if self.phase == "compensate" else PHASE_FORWARD,
        )


_UUID = uuid.UUID
_new_object = object.__new__
_set_slot = object.__setattr__
_UNKNOWN_SAFETY = uuid.SafeUUID.unknown
# Version 4 and RFC 4122 variant bits, as `uuid.UUID(bytes=..., version=4)` sets them.
_V4_CLEAR = ~(0xC000 << 48 | 0xF000 << 64)
_V4_SET = 0x8000 << 48 | 4 << 76
#: Ids drawn ahead from one `os.urandom` call (a system call per id costs more than building the UUID).
_ahead: list[int] = []
_AHEAD = 128
# A forked child must not hand out the ids its parent will hand out too.
os.register_at_fork(after_in_child=_ahead.clear)


def _draw() -> None:
    pool = os.urandom(16 * _AHEAD)
    _ahead.extend([int.from_bytes(pool[i : i + 16]) & _V4_CLEAR | _V4_SET for i in range(0, len(pool), 16)])


def random_uuid() -> uuid.UUID:
    """What `uuid.uuid4` returns (as random: `os.urandom`), built without ``UUID.__init__``'s argument
    checks and with one system call per 128 ids; a third of `uuid.uuid4`'s cost.

    Every execution and every request gets one.
    """
    if not _ahead:
        _draw()
    value = _new_object(_UUID)
    _set_slot(value, "int", _ahead.pop())
    _set_slot(value, "is_safe", _UNKNOWN_SAFETY)
    return value


def compact(data: bytes) -> bytes:
    """An exact-size copy of ``data``.

    Some orjson releases return bytes that keep a 4 KiB allocation behind a few dozen bytes; state and
    commands are kept for a while (in memory storage, in the outbox, in the in-memory broker), where that
    would cost 4 KiB per execution. Copying costs about a tenth of a microsecond.
    """
    return memoryview(data).tobytes()


def outbox_message(command: SagaCommand, *, delay: float | None = None) -> OutboxMessage:
    """The outbox row of a command (encodes its content; raises ``TypeError`` for non-JSON content).

    The row carries the command's request id, so storage publishes it only while the execution awaits
    that request; ``delay`` makes it due that many seconds later (a retry's backoff).
    """
    message = command.to_message()
    return OutboxMessage(
        message.topic, message.key, compact(message.value), message.headers, command.request_id, delay
    )


def exception_error(step: str | None, exc: BaseException) -> dict[str, Any]:
    """Structured error of a step that raised."""
    return {"step": step, "error": str(exc) or type(exc).__name__, "type": type(exc).__name__}
