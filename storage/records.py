"""Plain records that cross the storage port.

Frozen, slotted dataclasses: cheap to build on the hot path and safe to share between tasks. Storage knows
nothing of saga definitions; ``ExecutionRecord.state`` is an opaque JSON document owned by the engine, and
the indexed columns (status, name, deadlines, claim) are what storage queries by.
"""

from __future__ import annotations

import dataclasses
import inspect
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from storage.status import SagaStatus

__all__ = [
    "ExecutionQuery",
    "ExecutionRecord",
    "OutboxClaim",
    "OutboxMessage",
    "OutboxRecord",
    "QueryResult",
    "ReplyOutcome",
    "ReplyRecord",
    "StepKind",
    "StepPhase",
    "StepRecord",
    "StepState",
]

StepKind = Literal["local", "remote", "conditional"]
StepPhase = Literal["execute", "compensate"]
StepState = Literal["running", "waiting", "succeeded", "failed", "skipped"]
ReplyOutcome = Literal["applied", "duplicate", "stale", "unknown_status", "rejected"]


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One attempt history entry of a step (or of its compensation).

    Attributes:
        name: The step's stable name from the definition.
        kind: Local function, remote command, or conditional branch.
        phase: ``execute`` going forward, ``compensate`` while undoing.
        status: Outcome so far; ``waiting`` means a command was sent and its reply is awaited.
        attempts: How many times this step/phase was tried (retries and replays included).
        started_at: When the first attempt started (timezone-aware UTC).
        finished_at: When it reached a final outcome, if it has.
        request_id: The command's request id for remote steps.
        error: Structured error (``type``, ``message`` and, for replies, ``status``) when it failed.
    """

    name: str
    kind: StepKind
    phase: StepPhase
    status: StepState
    attempts: int
    started_at: datetime
    finished_at: datetime | None = None
    request_id: uuid.UUID | None = None
    error: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ExecutionRecord:
    """The durable row of one saga execution.

    Attributes:
        id: Execution id.
        name: Saga definition name.
        definition_version: Definition version the execution was started with.
        status: Current status.
        state: Engine-owned JSON document (context, cursor, awaited request), UTF-8 bytes.
        steps: Step history, oldest first.
        version: Optimistic concurrency version; ``create`` stores 1 and every ``save``/claim adds 1.
        recovery_attempts: How many recoveries failed so far.
        idempotency_key: Start key; a second start with the same key returns this execution.
        user: The user the saga runs for (forwarded in command headers).
        reply_deadline: For ``PAUSED``: when the awaited reply (or the saga's deadline) is overdue and the
            recovery query must pick the execution up.
        owner: Worker that holds the claim, if any.
        lease_until: When that claim expires unless renewed.
        error: Structured error of a failed, errored or dead-lettered execution.
        created_at: Set by storage on create.
        updated_at: Set by storage on every write (the database clock).
    """

    id: uuid.UUID
    name: str
    definition_version: int
    status: SagaStatus
    state: bytes
    steps: tuple[StepRecord, ...] = ()
    version: int = 0
    recovery_attempts: int = 0
    idempotency_key: str | None = None
    user: str | None = None
    reply_deadline: datetime | None = None
    owner: str | None = None
    lease_until: datetime | None = None
    error: Mapping[str, Any] | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A record to publish, written in the same transaction as the state that produced it."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class OutboxClaim:
    """Passed to ``create``/``save``: write the outbox rows already claimed, and report their ids.

    The writer can then publish the messages it holds and call ``mark_outbox_sent(claim.ids)`` without a
    ``fetch_outbox`` round trip. The rows are claimed exactly as ``fetch_outbox`` would claim them (by
    ``owner``, for ``lease_seconds``), so relays leave them alone meanwhile and take them over if the
    writer never marks them sent (crash, broker outage) once the lease has run out.

    Not a record: a mutable receipt, filled by the storage.

    Attributes:
        owner: Claim owner written on the rows.
        lease_seconds: How long the rows stay claimed.
        ids: The rows' ids, in the order of the ``outbox`` argument; filled once the write has committed
            (appended to), left untouched when it fails.
    """

    owner: str | None
    lease_seconds: float
    ids: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """A stored outbox row, unsent until ``mark_outbox_sent``."""

    id: int
    execution_id: uuid.UUID
    topic: str
    key: bytes | None
    value: bytes
    headers: Mapping[str, str]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ReplyRecord:
    """A reply as received: applied, or ignored with the reason why.

    Attributes:
        execution_id: Execution the reply names.
        request_id: Request it answers.
        status: Reply status code as received (200/400/500 or anything else).
        outcome: ``applied`` (state advanced), or why it was ignored.
        reason: Human-readable detail for ignored replies.
        received_at: Set by storage when omitted.
    """

    execution_id: uuid.UUID
    request_id: uuid.UUID
    status: int
    outcome: ReplyOutcome
    reason: str | None = None
    received_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ExecutionQuery:
    """Filter for ``SagaStorage.query``; every ``None`` means "any"."""

    statuses: Sequence[SagaStatus] | None = None
    names: Sequence[str] | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    updated_after: datetime | None = None
    updated_before: datetime | None = None
    offset: int = 0
    limit: int = 100


@dataclass(frozen=True, slots=True)
class QueryResult:
    """A page of executions (newest first) and how many match the filter in all."""

    rows: list[ExecutionRecord]
    total: int


# -- faster constructors for the records built on every step --------------------------------------------
#
# The dataclass-generated ``__init__`` of a frozen class goes through ``object.__setattr__`` once per field.
# These fill the slots through their descriptors instead: same signature, defaults and result, about half
# the cost (`ExecutionRecord`: 1.75 -> 0.9 µs; two are built per step, one by the engine, one by storage).
# The import-time check below keeps them in step with the fields.


def _execution_record_init(*s: Any) -> Any:
    (s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15) = s

    def __init__(
        self: ExecutionRecord,
        id: uuid.UUID,
        name: str,
        definition_version: int,
        status: SagaStatus,
        state: bytes,
        steps: tuple[StepRecord, ...] = (),
        version: int = 0,
        recovery_attempts: int = 0,
        idempotency_key: str | None = None,
        user: str | None = None,
        reply_deadline: datetime | None = None,
        owner: str | None = None,
        lease_until: datetime | None = None,
        error: Mapping[str, Any] | None = None,
        created_at: datetime | None = None,
        updated_at: datetime | None = None,
    ) -> None:
        s0(self, id)
        s1(self, name)
        s2(self, definition_version)
        s3(self, status)
        s4(self, state)
        s5(self, steps)
        s6(self, version)
        s7(self, recovery_attempts)
        s8(self, idempotency_key)
        s9(self, user)
        s10(self, reply_deadline)
        s11(self, owner)
        s12(self, lease_until)
        s13(self, error)
        s14(self, created_at)
        s15(self, updated_at)

    return __init__


def _step_record_init(*s: Any) -> Any:
    (s0, s1, s2, s3, s4, s5, s6, s7, s8) = s

    def __init__(
        self: StepRecord,
        name: str,
        kind: StepKind,
        phase: StepPhase,
        status: StepState,
        attempts: int,
        started_at: datetime,
        finished_at: datetime | None = None,
        request_id: uuid.UUID | None = None,
        error: Mapping[str, Any] | None = None,
    ) -> None:
        s0(self, name)
        s1(self, kind)
        s2(self, phase)
        s3(self, status)
        s4(self, attempts)
        s5(self, started_at)
        s6(self, finished_at)
        s7(self, request_id)
        s8(self, error)

    return __init__


def _install_init(cls: type[Any], factory: Callable[..., Any]) -> None:
    fields = dataclasses.fields(cls)
    init = factory(*(cls.__dict__[f.name].__set__ for f in fields))
    expected = [(f.name, f.default) for f in fields]
    parameters = list(inspect.signature(init).parameters.values())[1:]
    actual = [(p.name, dataclasses.MISSING if p.default is p.empty else p.default) for p in parameters]
    if actual != expected or any(f.default_factory is not dataclasses.MISSING for f in fields):
        raise ImportError(f"{cls.__name__}: fields changed, update its __init__ in storage/records.py")
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init


_install_init(ExecutionRecord, _execution_record_init)
_install_init(StepRecord, _step_record_init)
