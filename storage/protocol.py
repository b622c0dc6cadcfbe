"""The storage port: everything the orchestrator persists, behind one protocol.

Adapters: `MemorySagaStorage` (embedded default and unit tests) and `SqlAlchemySagaStorage` (PostgreSQL via
asyncpg, SQLite via aiosqlite). One contract suite runs against all of them, so the rules below hold for
every backend:

* Every write that changes an execution bumps ``version`` and ``updated_at`` (the database clock), except
  ``renew_claim``, which only moves ``lease_until``. ``save`` is optimistic: it applies only if the stored
  version equals ``record.version`` and otherwise raises `ConcurrencyError` having changed nothing. It
  also writes the claim the record carries (``owner=None`` releases it in the same statement).
* ``save(..., outbox=..., reply=...)`` writes the state, the outbox rows and the applied-reply dedup row in
  one transaction: all of it or none of it.
* Claims give one worker at a time the right to advance an execution: a claim succeeds only when the row is
  unowned, owned by the same worker, or its lease has expired.
* Fencing: an outbox command (a row with a ``request_id``) is published only while its execution awaits that
  request (``awaiting_request``): ``fetch_outbox`` skips rows of requests left behind, and every ``save``
  cancels, in its own transaction, the unsent commands of the execution whose request the saved record no
  longer awaits. A delayed row (``OutboxMessage.delay``) is not fetched before it is due.
* One clock: every time storage writes or compares comes from one source, the database's (PostgreSQL
  ``now()``; SQLite and memory: the storage's clock, injectable in tests).
* Missing ids raise `ExecutionNotFoundError` naming the id.
* The recovery methods keep python-cqrs's names, signatures and defaults so code written for it ports over.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from storage.records import (
    ExecutionQuery,
    ExecutionRecord,
    OutboxBacklog,
    OutboxClaim,
    OutboxMessage,
    OutboxRecord,
    QueryResult,
    ReplyRecord,
    StepRecord,
)
from storage.status import SagaStatus

__all__ = [
    "ISagaStorage",
    "SagaStorage",
    "SupportsClaimMany",
    "SupportsDatabaseTime",
    "SupportsListOutbox",
    "SupportsLoadMany",
    "SupportsOutboxBacklog",
    "SupportsOutboxOutcomes",
]


@runtime_checkable
class SagaStorage(Protocol):
    """Durable state of saga executions, their outbox, reply dedup and participant replies."""

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open connections (and, where configured, bring the schema up to date); idempotent."""
        ...

    async def stop(self) -> None:
        """Close connections; idempotent."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    # -- executions ------------------------------------------------------------------------------------

    async def create(
        self,
        record: ExecutionRecord,
        *,
        outbox: Sequence[OutboxMessage] = (),
        outbox_claim: OutboxClaim | None = None,
    ) -> ExecutionRecord:
        """Insert a new execution (stored with ``version=1``) and its outbox rows in one transaction.

        With ``outbox_claim``, the outbox rows are written claimed by its owner for its lease and their ids
        are appended to ``outbox_claim.ids`` once committed (see `OutboxClaim`).

        Raises:
            DuplicateIdempotencyKeyError: ``record.idempotency_key`` already started another execution.
        """
        ...

    async def load(self, saga_id: uuid.UUID) -> ExecutionRecord:
        """Return the stored execution. Raises `ExecutionNotFoundError`."""
        ...

    async def find_by_idempotency_key(self, idempotency_key: str) -> ExecutionRecord | None:
        """Return the execution started with this key, if any."""
        ...

    async def save(
        self,
        record: ExecutionRecord,
        *,
        outbox: Sequence[OutboxMessage] = (),
        reply: ReplyRecord | None = None,
        outbox_claim: OutboxClaim | None = None,
    ) -> ExecutionRecord:
        """Write ``record`` if the stored version is still ``record.version``; return it as stored.

        The outbox rows and the applied ``reply`` dedup row go in the same transaction. ``save`` writes the
        mutable columns (status, state, steps, recovery_attempts, user, reply_deadline, error) and the claim
        as the record carries it: ``owner=None`` releases the claim (``lease_until`` is then cleared too),
        so a save that pauses or ends an execution needs no `release_claim` after it; a record that still
        names the stored owner keeps the claim, and its lease is never shortened (a heartbeat may have
        extended it after the record was read: the later of the stored and the given ``lease_until``
        wins). That is safe because the write is version-checked: every claim bumps ``version``, so only
        the current holder's copy (or, with no claim, the latest copy) can be saved. Identity (id, name,
        definition_version, idempotency_key, created_at) is left as stored; the returned record shows
        every column as stored.

        With ``outbox_claim``, the outbox rows are written claimed by its owner for its lease and their ids
        are appended to ``outbox_claim.ids`` once committed, so the caller can publish and mark them sent
        with no `fetch_outbox` (see `OutboxClaim`); without it they are written unclaimed, for any relay.
        A delayed row is written unclaimed either way (it is due later, for a relay).

        In the same transaction the execution's unsent commands whose ``request_id`` is not the record's
        ``awaiting_request`` are cancelled (never published): the execution moved past them.

        Raises:
            ConcurrencyError: The stored version moved on; nothing was written.
            DuplicateReplyError: ``reply`` was already applied; nothing was written.
            ExecutionNotFoundError: No such execution.
        """
        ...

    async def get_steps(self, saga_id: uuid.UUID) -> list[StepRecord]:
        """Step history of an execution, oldest first. Raises `ExecutionNotFoundError`."""
        ...

    async def query(self, query: ExecutionQuery | None = None) -> QueryResult:
        """Executions matching ``query``, newest ``created_at`` first, and the total count matching it.

        Time windows are half-open: ``*_after`` is inclusive, ``*_before`` exclusive.
        """
        ...

    async def count_by_status(self) -> dict[SagaStatus, int]:
        """How many executions are in each status (statuses with none are omitted)."""
        ...

    # -- recovery (python-cqrs compatible) -------------------------------------------------------------

    async def get_sagas_for_recovery(
        self,
        limit: int,
        max_recovery_attempts: int = 5,
        stale_after_seconds: int | None = None,
        saga_name: str | None = None,
    ) -> list[uuid.UUID]:
        """Ids of executions to recover, oldest ``updated_at`` first, at most ``limit``.

        Recoverable: ``RUNNING``, ``COMPENSATING``, ``FAILED``, and ``PAUSED`` whose ``reply_deadline`` has
        passed; only with ``recovery_attempts < max_recovery_attempts``; with ``stale_after_seconds``, only
        rows whose ``updated_at`` is older than the database's now minus that; with ``saga_name``, only that
        saga's rows.
        """
        ...

    async def increment_recovery_attempts(
        self, saga_id: uuid.UUID, new_status: SagaStatus | None = None
    ) -> None:
        """Add one to ``recovery_attempts`` (and set ``status`` if given) in one atomic statement."""
        ...

    async def set_recovery_attempts(self, saga_id: uuid.UUID, attempts: int) -> None:
        """Set ``recovery_attempts`` to ``attempts`` (0 re-enables recovery; the maximum excludes it)."""
        ...

    # -- claims ----------------------------------------------------------------------------------------

    async def claim(self, saga_id: uuid.UUID, owner: str, *, lease_seconds: float) -> ExecutionRecord | None:
        """Take (or keep) the claim on one execution; return it as stored, or ``None`` if another holds it.

        A successful claim bumps ``version``, so a record read by a previous holder can no longer be saved.

        Raises `ExecutionNotFoundError`.
        """
        ...

    async def claim_for_recovery(
        self,
        owner: str,
        *,
        limit: int,
        lease_seconds: float,
        max_recovery_attempts: int = 5,
        stale_after_seconds: int | None = None,
        saga_name: str | None = None,
    ) -> list[ExecutionRecord]:
        """Atomically claim up to ``limit`` recoverable, unclaimed (or lease-expired) executions.

        Same selection as `get_sagas_for_recovery`. On PostgreSQL rows are locked with ``FOR UPDATE SKIP
        LOCKED`` so concurrent workers never receive the same row.
        """
        ...

    async def renew_claim(self, saga_id: uuid.UUID, owner: str, *, lease_seconds: float) -> bool:
        """Heartbeat: extend the lease if ``owner`` still holds it; ``False`` if it lost the claim."""
        ...

    async def release_claim(self, saga_id: uuid.UUID, owner: str) -> None:
        """Drop the claim if ``owner`` holds it (no-op otherwise); dropping it bumps ``version``.

        Raises `ExecutionNotFoundError` (as does `renew_claim`).
        """
        ...

    # -- replies ---------------------------------------------------------------------------------------

    async def record_reply(self, reply: ReplyRecord) -> None:
        """Record a reply that was ignored (duplicate, stale, unknown status) for the audit trail."""
        ...

    async def list_replies(self, saga_id: uuid.UUID) -> list[ReplyRecord]:
        """Every reply recorded for an execution, applied or ignored, in arrival order."""
        ...

    # -- outbox ----------------------------------------------------------------------------------------

    async def fetch_outbox(
        self, limit: int = 100, *, owner: str | None = None, lease_seconds: float = 30.0
    ) -> list[OutboxRecord]:
        """Unsent outbox rows, oldest first, claimed for ``lease_seconds`` so two relays skip each other.

        Only rows that are due (no live claim, no pending delay) and current: a command whose execution no
        longer awaits its request is left out.
        """
        ...

    async def mark_outbox_sent(self, ids: Sequence[int]) -> None:
        """Mark outbox rows as published."""
        ...

    # -- participant side ------------------------------------------------------------------------------

    async def get_command_reply(self, idempotency_key: str) -> bytes | None:
        """The stored reply of a command already handled under this key, if any."""
        ...

    async def put_command_reply(self, idempotency_key: str, reply: bytes) -> None:
        """Remember the reply of a handled command (first write wins)."""
        ...


@runtime_checkable
class SupportsOutboxOutcomes(Protocol):
    """A storage that keeps per-row publish outcomes: optional, like `SupportsLoadMany`.

    The relay backs off each row that failed transiently on its own and takes rows the broker refuses for
    good out of the queue, so no row blocks another; without it a failed batch stays claimed until its
    lease ends. Both adapters here implement it.
    """

    async def defer_outbox(self, delays: Mapping[int, float]) -> None:
        """Release each unsent row of ``delays``, not due again before that many seconds from now (the
        storage's clock), with its ``attempts`` counted up by one."""
        ...

    async def reject_outbox(self, errors: Mapping[int, Mapping[str, Any]]) -> None:
        """Mark each row of ``errors`` done for good (never fetched again) with its structured error."""
        ...


@runtime_checkable
class SupportsDatabaseTime(Protocol):
    """A storage that tells its clock's time, so the orchestrator sets deadlines on the same clock."""

    async def database_time(self) -> datetime:
        """The current time of the clock the storage's statements use (timezone-aware)."""
        ...


@runtime_checkable
class SupportsLoadMany(Protocol):
    """A storage that reads many executions in one round trip: an optional capability, not in `SagaStorage`.

    The orchestrator polls every execution its callers wait on with one call per interval instead of one
    `SagaStorage.load` each; storages without it (code written against the port before it) keep working
    through ``load``. Both adapters here implement it.
    """

    async def load_many(self, ids: Sequence[uuid.UUID]) -> list[ExecutionRecord]:
        """The stored executions among ``ids``, in the order of ``ids``, each once; unknown ids are absent."""
        ...


@runtime_checkable
class SupportsClaimMany(Protocol):
    """A storage that claims many executions in one round trip: optional, like `SupportsLoadMany`.

    The orchestrator claims the executions of replies that arrive together with one call instead of one
    `SagaStorage.claim` each; storages without it keep working through ``claim``.
    """

    async def claim_many(
        self, ids: Sequence[uuid.UUID], owner: str, *, lease_seconds: float
    ) -> list[ExecutionRecord]:
        """`SagaStorage.claim` for each of ``ids``: the records now claimed by ``owner``, in the order of
        ``ids``, each once. Unknown ids and executions another owner's live lease holds are absent."""
        ...


@runtime_checkable
class SupportsOutboxBacklog(Protocol):
    """A storage that reports its outbox backlog: optional, like `SupportsLoadMany` (metrics use it)."""

    async def outbox_backlog(self) -> OutboxBacklog:
        """How many outbox rows are unsent and how long the oldest has waited (the storage's clock)."""
        ...


@runtime_checkable
class SupportsListOutbox(Protocol):
    """A storage that lists an execution's outbox rows: optional, for admin tools.

    The console shows the commands an execution sent, with their headers. No index serves it (one would
    cost every hot-path insert): an admin read of one execution, not a hot one.
    """

    async def list_outbox(self, saga_id: uuid.UUID) -> list[OutboxRecord]:
        """Every outbox row written for ``saga_id``, sent or not, oldest first."""


@runtime_checkable
class SupportsDefinitionCounts(Protocol):
    """A storage that counts executions per definition version: optional, like `SupportsLoadMany`.

    ``kafka-saga worker`` and ``kafka-saga stats`` use it to show unfinished executions whose definition
    version the process does not register (their replies wait until it does).
    """

    async def count_by_definition(self) -> dict[tuple[str, int, SagaStatus], int]:
        """Executions per ``(name, definition version, status)``; combinations with none are omitted."""
        ...


#: Alias kept for code written against python-cqrs's ``ISagaStorage``.
ISagaStorage = SagaStorage
