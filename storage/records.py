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
        awaiting_request: For an execution waiting for a reply: the request id it awaits. Storage
            publishes an outbox command only while its execution awaits the command's request, and a save
            that moves past a request cancels that request's unsent rows (see `SagaStorage.save`).
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
    awaiting_request: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A record to publish, written in the same transaction as the state that produced it.

    Attributes:
        topic: Where it goes.
        key: Partitioning key.
        value: Payload.
        headers: Header names and values.
        request_id: For a command, the request it carries: storage publishes the row only while its
            execution awaits that request (``ExecutionRecord.awaiting_request``). ``None`` for messages
            that are not fenced by a request (decisions).
        delay: Seconds before the row is due (a retry's backoff), counted on the database's clock. A
            delayed row is written unclaimed, for a relay to publish once due; its writer does not publish
            it itself.
    """

    topic: str
    key: bytes | None
    value: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    request_id: uuid.UUID | None = None
    delay: float | None = None


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
    """A stored outbox row, unsent until ``mark_outbox_sent``.

    ``request_id`` is the command's request (see `OutboxMessage`); ``attempts`` counts the publishes that
    failed transiently so far (`SagaStorage.defer_outbox`), which the relay's backoff grows with.
    """

    id: int
    execution_id: uuid.UUID
    topic: str
    key: bytes | None
    value: bytes
    headers: Mapping[str, str]
    created_at: datetime
    request_id: uuid.UUID | None = None
    attempts: int = 0


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
    #: Only definition versions among these.
    versions: Sequence[int] | None = None
    #: Only the execution started with this idempotency key.
    idempotency_key: str | None = None
    #: ``True``: only PAUSED executions whose reply deadline has passed (database clock); ``False``: only
    #: the others.
    overdue: bool | None = None
    #: Only executions whose stored error contains this text (case-insensitive).
    error_text: str | None = None
    #: Keyset paging: only rows after this ``(created_at, id)`` in the newest-first order, i.e. the last
    #: row of the previous page. Unlike ``offset`` it costs the same on the thousandth page as on the first.
    after: tuple[datetime, uuid.UUID] | None = None
    #: Count at most this many matches (``total`` then stops there); ``None`` counts them all. A capped
    #: count stops scanning early on a large table.
    count_limit: int | None = None
    offset: int = 0
    limit: int = 100


@dataclass(frozen=True, slots=True)
class OutboxBacklog:
    """What the outbox relays still have to publish (for metrics and the console).

    Attributes:
        rows: Unsent outbox rows.
        oldest_age_seconds: How long the oldest of them has waited (``None`` when there are none).
    """

    rows: int
    oldest_age_seconds: float | None


def backlog(rows: int, oldest: datetime | None, now: datetime) -> OutboxBacklog:
    """An `OutboxBacklog` from the count, the oldest row's time and the current time on the same clock."""
    age = None if oldest is None else max(0.0, (now - oldest).total_seconds())
    return OutboxBacklog(rows=rows, oldest_age_seconds=age)


@dataclass(frozen=True, slots=True)
class QueryResult:
    """A page of executions (newest first) and how many match the filter in all."""

    rows: list[ExecutionRecord]
    total: int


# -- faster constructors for the records built on every step --------------------------------------------
#
# The dataclass-generated ``__init__`` of a frozen class goes through ``object.__setattr__`` once per field,
# and a frozen class's own ``__setattr__`` keeps the interpreter from its fast slot stores. So these two
# records are built by `new_execution_record` / `new_step_record` instead: each makes an instance of a
# *shadow*, a plain class with the very same slots, fills the slots with ordinary stores, and retypes it
# (same layout, so CPython allows the ``__class__`` assignment), frozen from then on. The classes' own
# constructor goes through them (``__new__``; ``__init__`` is ``object.__init__``), with the same signature,
# defaults and result as the dataclass one, at a third of its cost; hot paths call them directly, which also
# skips the type call (`ExecutionRecord`: 1.75 -> 0.45 µs; two are built per step, one by the engine, one by
# storage). ``__reduce__`` gives pickle and `copy` the field values, which ``__new__`` needs.
# Written out by hand (no generated code); `_install` checks them against the fields.


def _shadow(cls: type[Any]) -> type[Any]:
    return type(f"_{cls.__name__}Shadow", (), {"__slots__": cls.__slots__, "__module__": __name__})


_ExecutionRecordShadow = _shadow(ExecutionRecord)
_StepRecordShadow = _shadow(StepRecord)


def new_execution_record(
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
    awaiting_request: uuid.UUID | None = None,
) -> ExecutionRecord:
    """``ExecutionRecord(...)``: the same arguments and result, for hot paths (see above)."""
    self = _ExecutionRecordShadow()
    self.id = id
    self.name = name
    self.definition_version = definition_version
    self.status = status
    self.state = state
    self.steps = steps
    self.version = version
    self.recovery_attempts = recovery_attempts
    self.idempotency_key = idempotency_key
    self.user = user
    self.reply_deadline = reply_deadline
    self.owner = owner
    self.lease_until = lease_until
    self.error = error
    self.created_at = created_at
    self.updated_at = updated_at
    self.awaiting_request = awaiting_request
    self.__class__ = ExecutionRecord
    return self  # type: ignore[no-any-return]


def new_step_record(
    name: str,
    kind: StepKind,
    phase: StepPhase,
    status: StepState,
    attempts: int,
    started_at: datetime,
    finished_at: datetime | None = None,
    request_id: uuid.UUID | None = None,
    error: Mapping[str, Any] | None = None,
) -> StepRecord:
    """``StepRecord(...)``: the same arguments and result, for hot paths (see above)."""
    self = _StepRecordShadow()
    self.name, self.kind, self.phase, self.status = name, kind, phase, status
    self.attempts, self.started_at, self.finished_at = attempts, started_at, finished_at
    self.request_id, self.error = request_id, error
    self.__class__ = StepRecord
    return self  # type: ignore[no-any-return]


def _reduce(self: Any) -> str | tuple[Any, ...]:
    return type(self), tuple([getattr(self, name) for name in type(self).__slots__])


def _install(cls: type[Any], build: Callable[..., Any]) -> None:
    fields = dataclasses.fields(cls)
    names = tuple(f.name for f in fields)
    expected = [(f.name, f.default) for f in fields]
    parameters = inspect.signature(build).parameters.values()
    actual = [(p.name, dataclasses.MISSING if p.default is p.empty else p.default) for p in parameters]
    if (
        cls.__slots__ != names
        or actual != expected
        or any(f.default_factory is not dataclasses.MISSING for f in fields)
    ):
        raise ImportError(f"{cls.__name__}: fields changed, update {build.__name__} in storage/records.py")

    def __new__(of: type[Any], /, *args: Any, **kwargs: Any) -> Any:
        record = build(*args, **kwargs)
        if of is not cls:  # a subclass (without slots of its own)
            _retype(record, "__class__", of)
        return record

    __new__.__qualname__ = f"{cls.__qualname__}.__new__"
    cls.__new__ = staticmethod(__new__)
    cls.__init__ = object.__init__
    cls.__reduce__ = _reduce  # type: ignore[assignment]  # a function, bound on access like any method
    # Every parameter must land in the slot of its name: build one and read it back.
    sample = cls(*(f"{name}!" for name in names))
    filled = [(name, getattr(sample, name, None)) for name in names]
    if type(sample) is not cls or filled != [(n, f"{n}!") for n in names]:
        raise ImportError(f"{cls.__name__}: {build.__name__} in storage/records.py misses a field")


_retype = object.__setattr__
_install(ExecutionRecord, new_execution_record)
_install(StepRecord, new_step_record)
