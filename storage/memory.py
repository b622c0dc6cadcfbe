"""In-memory `SagaStorage`: the embedded default and the fake every unit test runs against.

It implements the whole port with the same rules as the SQL adapter (the contract suite runs against both),
so code tested on it behaves the same on PostgreSQL. Nothing survives the process.

Concurrency: every method body runs without an ``await`` between reading and writing the dicts, so under
asyncio each call is atomic with respect to other tasks; no lock is needed. Records are frozen dataclasses,
and the only mutable parts they may carry (``error`` and ``headers`` mappings) are copied on the way in and
on the way out, through JSON like the SQL adapter stores them, so callers can never change stored state
behind the storage's back.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

import orjson

from storage._json import json_copy
from storage.errors import (
    ConcurrencyError,
    DuplicateIdempotencyKeyError,
    DuplicateReplyError,
    ExecutionAlreadyExistsError,
    ExecutionNotFoundError,
)
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
    backlog,
    new_execution_record,
    new_step_record,
)
from storage.status import RECOVERABLE_STATUSES, SagaStatus

__all__ = ["Clock", "MemorySagaStorage"]

#: Returns the current time, timezone-aware. Injected so tests can move time for leases and staleness.
Clock = Callable[[], datetime]


#: The default clock: timezone-aware UTC now, as a C-level partial (it is read on every write).
_utc_now: Clock = functools.partial(datetime.now, UTC)


def _copy_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    # A JSON round trip rather than deepcopy: it copies, and it refuses (TypeError) exactly what the SQL
    # adapter's JSON columns would refuse, so tests on memory catch it too.
    return None if value is None else json_copy(value)


def _clean_steps(steps: tuple[StepRecord, ...]) -> bool:
    """Whether no step carries an error mapping (the usual case: nothing mutable to isolate)."""
    for s in steps:  # noqa: SIM110 - a plain loop: all() over a generator costs twice as much here
        if s.error is not None:
            return False
    return True


def _copy_steps(steps: Iterable[StepRecord]) -> tuple[StepRecord, ...]:
    # Only the error mapping (of failed steps) is mutable; everything else in a StepRecord is immutable.
    # Copies are built positionally, not through dataclasses.replace (ten times dearer): once a saga has
    # failed, every later write copies its failed steps twice, on the way in and on the way out.
    return tuple(
        [
            s
            if s.error is None
            else new_step_record(
                s.name,
                s.kind,
                s.phase,
                s.status,
                s.attempts,
                s.started_at,
                s.finished_at,
                s.request_id,
                _copy_mapping(s.error),
            )
            for s in steps
        ]
    )


def _copy_record(r: ExecutionRecord) -> ExecutionRecord:
    """``r`` itself when it holds nothing mutable (records are frozen, ``state`` is bytes), else a
    copy with fresh ``error`` mappings, so callers never share a mutable object with the store."""
    if r.error is None and _clean_steps(r.steps):
        return r
    return new_execution_record(
        r.id,
        r.name,
        r.definition_version,
        r.status,
        r.state,
        _copy_steps(r.steps),
        r.version,
        r.recovery_attempts,
        r.idempotency_key,
        r.user,
        r.reply_deadline,
        r.owner,
        r.lease_until,
        _copy_mapping(r.error),
        r.created_at,
        r.updated_at,
        r.awaiting_request,
    )


def _updated_order(record: ExecutionRecord) -> tuple[datetime, bytes]:
    assert record.updated_at is not None
    return record.updated_at, record.id.bytes


def _overdue(record: ExecutionRecord, now: datetime) -> bool:
    deadline = record.reply_deadline
    return record.status is SagaStatus.PAUSED and deadline is not None and deadline < now


def _error_text(error: Mapping[str, Any]) -> str:
    return orjson.dumps(error, option=orjson.OPT_NON_STR_KEYS).decode().lower()


def _created_order(record: ExecutionRecord) -> tuple[datetime, bytes]:
    assert record.created_at is not None
    return record.created_at, record.id.bytes


@dataclasses.dataclass(slots=True)
class _OutboxRow:
    """Mutable bookkeeping around an immutable outbox record."""

    record: OutboxRecord
    sent_at: datetime | None = None
    claimed_by: str | None = None
    claimed_until: datetime | None = None
    attempts: int = 0
    outcome: str | None = None
    error: Mapping[str, Any] | None = None


class MemorySagaStorage:
    """`SagaStorage` kept in dicts.

    Args:
        clock: Source of "now" for ``updated_at``, leases, reply deadlines and staleness; defaults to the
            system clock in UTC. Tests pass a controllable clock instead of sleeping.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or _utc_now
        self._executions: dict[uuid.UUID, ExecutionRecord] = {}
        self._by_key: dict[str, uuid.UUID] = {}
        self._replies: dict[uuid.UUID, list[ReplyRecord]] = {}
        self._applied: set[tuple[uuid.UUID, uuid.UUID]] = set()
        self._outbox: dict[int, _OutboxRow] = {}
        #: The unsent rows only, in id order: what `fetch_outbox` scans (sent rows are never looked at).
        self._unsent: dict[int, _OutboxRow] = {}
        #: The unsent commands (rows with a request id) by execution: what a save's cancel looks at.
        self._unsent_commands: dict[uuid.UUID, dict[int, _OutboxRow]] = {}
        self._outbox_ids = itertools.count(1)
        self._command_replies: dict[str, bytes] = {}

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to open; present for the port."""

    async def stop(self) -> None:
        """Nothing to close; the data stays until the object is dropped."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- helpers ---------------------------------------------------------------------------------------

    def _get(self, saga_id: uuid.UUID) -> ExecutionRecord:
        try:
            return self._executions[saga_id]
        except KeyError:
            raise ExecutionNotFoundError(saga_id) from None

    def _append_outbox(
        self,
        execution_id: uuid.UUID,
        outbox: Sequence[OutboxMessage],
        now: datetime,
        claim: OutboxClaim | None,
    ) -> None:
        for message in outbox:
            row_id = next(self._outbox_ids)
            if message.delay is not None:  # due later, for a relay: unclaimed, not before its delay
                claimed_by, claimed_until = None, now + timedelta(seconds=message.delay)
            elif claim is None:
                claimed_by, claimed_until = None, None
            else:
                claimed_by, claimed_until = claim.owner, now + timedelta(seconds=claim.lease_seconds)
            row = _OutboxRow(
                OutboxRecord(
                    row_id,
                    execution_id,
                    message.topic,
                    message.key,
                    message.value,
                    dict(message.headers),
                    now,
                    message.request_id,
                ),
                None,
                claimed_by,
                claimed_until,
            )
            self._outbox[row_id] = self._unsent[row_id] = row
            if message.request_id is not None:
                self._unsent_commands.setdefault(execution_id, {})[row_id] = row
            if claim is not None:
                claim.ids.append(row_id)

    def _cancel_moved_past(self, execution_id: uuid.UUID, awaiting: uuid.UUID | None, now: datetime) -> None:
        """Cancel the execution's unsent commands of requests other than ``awaiting`` (see `save`)."""
        commands = self._unsent_commands.get(execution_id)
        if not commands:
            return
        for row_id, row in list(commands.items()):
            if row.record.request_id != awaiting:
                row.sent_at, row.outcome = now, "cancelled"
                del commands[row_id]
                self._unsent.pop(row_id, None)
        if not commands:
            del self._unsent_commands[execution_id]

    def _done(self, row: _OutboxRow) -> None:
        """Take a row out of the unsent indexes."""
        record = self._unsent.pop(row.record.id, None)
        if record is not None and row.record.request_id is not None:
            commands = self._unsent_commands.get(row.record.execution_id)
            if commands is not None:
                commands.pop(row.record.id, None)
                if not commands:
                    del self._unsent_commands[row.record.execution_id]

    def _add_reply(self, reply: ReplyRecord, now: datetime) -> None:
        if reply.received_at is None:
            reply = dataclasses.replace(reply, received_at=now)
        self._replies.setdefault(reply.execution_id, []).append(reply)
        if reply.outcome == "applied":
            self._applied.add((reply.execution_id, reply.request_id))

    def _check_reply(self, reply: ReplyRecord | None) -> None:
        if (
            reply is not None
            and reply.outcome == "applied"
            and (reply.execution_id, reply.request_id) in self._applied
        ):
            raise DuplicateReplyError(reply.execution_id, reply.request_id)

    def _recoverable(
        self,
        record: ExecutionRecord,
        now: datetime,
        max_recovery_attempts: int,
        stale_before: datetime | None,
        saga_name: str | None,
    ) -> bool:
        if record.status in RECOVERABLE_STATUSES:
            pass
        elif record.status is SagaStatus.PAUSED:
            if record.reply_deadline is None or record.reply_deadline >= now:
                return False
        else:
            return False
        if record.recovery_attempts >= max_recovery_attempts:
            return False
        if saga_name is not None and record.name != saga_name:
            return False
        assert record.updated_at is not None
        return stale_before is None or record.updated_at < stale_before

    @staticmethod
    def _claimable(record: ExecutionRecord, owner: str | None, now: datetime) -> bool:
        return (
            record.owner is None
            or record.owner == owner
            or record.lease_until is None
            or record.lease_until < now
        )

    def _recovery_candidates(
        self,
        max_recovery_attempts: int,
        stale_after_seconds: int | None,
        saga_name: str | None,
    ) -> list[ExecutionRecord]:
        now = self._clock()
        stale_before = None if stale_after_seconds is None else now - timedelta(seconds=stale_after_seconds)
        found = [
            r
            for r in self._executions.values()
            if self._recoverable(r, now, max_recovery_attempts, stale_before, saga_name)
        ]
        found.sort(key=_updated_order)
        return found

    def _touch(self, record: ExecutionRecord, **changes: Any) -> ExecutionRecord:
        """Store ``record`` with ``changes``, the next version and a fresh ``updated_at``."""
        stored = dataclasses.replace(record, version=record.version + 1, updated_at=self._clock(), **changes)
        self._executions[record.id] = stored
        return stored

    # -- executions ------------------------------------------------------------------------------------

    async def create(
        self,
        record: ExecutionRecord,
        *,
        outbox: Sequence[OutboxMessage] = (),
        outbox_claim: OutboxClaim | None = None,
    ) -> ExecutionRecord:
        """Insert a new execution (``version=1``) and its outbox rows; see `SagaStorage.create`."""
        if record.idempotency_key is not None and record.idempotency_key in self._by_key:
            existing = self._by_key[record.idempotency_key]
            raise DuplicateIdempotencyKeyError(
                record.idempotency_key,
                existing,
                existing_saga=self._executions[existing].name,
                saga=record.name,
            )
        now = self._clock()
        steps = record.steps if type(record.steps) is tuple else tuple(record.steps)
        clean = record.error is None and _clean_steps(steps)
        if not clean:
            steps = _copy_steps(steps)
        # Built directly (positional, in field order) rather than through dataclasses.replace: this runs
        # once per saga on the hot path.
        stored = new_execution_record(
            record.id,
            record.name,
            record.definition_version,
            record.status,
            record.state,
            steps,
            1,
            record.recovery_attempts,
            record.idempotency_key,
            record.user,
            record.reply_deadline,
            record.owner,
            record.lease_until,
            None if record.error is None else _copy_mapping(record.error),
            now,
            now,
            record.awaiting_request,
        )
        # One hash of the id for the check and the insert (setdefault never replaces a stored row).
        if self._executions.setdefault(record.id, stored) is not stored:
            # The SQL adapter fails on the primary key the same way: the caller expected no row at all.
            raise ExecutionAlreadyExistsError(record.id)
        if record.idempotency_key is not None:
            self._by_key[record.idempotency_key] = record.id
        if outbox:
            self._append_outbox(record.id, outbox, now, outbox_claim)
        return stored if clean else _copy_record(stored)

    async def load(self, saga_id: uuid.UUID) -> ExecutionRecord:
        """Return the stored execution; see `SagaStorage.load`."""
        return _copy_record(self._get(saga_id))

    async def load_many(self, ids: Sequence[uuid.UUID]) -> list[ExecutionRecord]:
        """The stored executions among ``ids``, in their order, each once; see `SupportsLoadMany`."""
        executions = self._executions
        return [_copy_record(executions[i]) for i in dict.fromkeys(ids) if i in executions]

    async def find_by_idempotency_key(self, idempotency_key: str) -> ExecutionRecord | None:
        """Return the execution started with this key, if any."""
        saga_id = self._by_key.get(idempotency_key)
        return None if saga_id is None else _copy_record(self._executions[saga_id])

    async def save(
        self,
        record: ExecutionRecord,
        *,
        outbox: Sequence[OutboxMessage] = (),
        reply: ReplyRecord | None = None,
        outbox_claim: OutboxClaim | None = None,
    ) -> ExecutionRecord:
        """Optimistic write of state, outbox and applied reply, all or nothing; see `SagaStorage.save`."""
        current = self._executions.get(record.id)
        if current is None:
            raise ExecutionNotFoundError(record.id)
        if current.version != record.version:
            raise ConcurrencyError(record.id, record.version)
        if reply is not None:
            self._check_reply(reply)
        steps = record.steps if type(record.steps) is tuple else tuple(record.steps)
        clean = record.error is None and _clean_steps(steps)
        if not clean:
            steps = _copy_steps(steps)
        now = self._clock()
        # The claim as the record carries it (None releases it), never shortening the holder's own lease:
        # a heartbeat may have extended it since the record was read (renew_claim keeps the version).
        owner = record.owner
        if owner is None:
            lease_until = None
        else:
            lease_until = record.lease_until
            held = current.lease_until
            if owner == current.owner and held is not None and lease_until is not None and held > lease_until:
                lease_until = held
        # Identity and creation columns are not the caller's to change through save. Built directly
        # (positional, in field order): this runs once per step.
        stored = new_execution_record(
            current.id,
            current.name,
            current.definition_version,
            record.status,
            record.state,
            steps,
            current.version + 1,
            record.recovery_attempts,
            current.idempotency_key,
            record.user,
            record.reply_deadline,
            owner,
            lease_until,
            None if record.error is None else _copy_mapping(record.error),
            current.created_at,
            now,
            record.awaiting_request,
        )
        self._executions[record.id] = stored
        self._cancel_moved_past(record.id, record.awaiting_request, now)
        if outbox:
            self._append_outbox(record.id, outbox, now, outbox_claim)
        if reply is not None:
            self._add_reply(reply, now)
        return stored if clean else _copy_record(stored)

    async def get_steps(self, saga_id: uuid.UUID) -> list[StepRecord]:
        """Step history, oldest first; see `SagaStorage.get_steps`."""
        return list(_copy_steps(self._get(saga_id).steps))

    async def query(self, query: ExecutionQuery | None = None) -> QueryResult:
        """Filtered page of executions, newest first, with the total; see `SagaStorage.query`."""
        q = query or ExecutionQuery()
        statuses = None if q.statuses is None else set(q.statuses)
        names = None if q.names is None else set(q.names)

        def match(r: ExecutionRecord) -> bool:
            assert r.created_at is not None and r.updated_at is not None
            return (
                (statuses is None or r.status in statuses)
                and (names is None or r.name in names)
                and (q.created_after is None or r.created_at >= q.created_after)
                and (q.created_before is None or r.created_at < q.created_before)
                and (q.updated_after is None or r.updated_at >= q.updated_after)
                and (q.updated_before is None or r.updated_at < q.updated_before)
                and (versions is None or r.definition_version in versions)
                and (q.idempotency_key is None or r.idempotency_key == q.idempotency_key)
                and (q.overdue is None or _overdue(r, now) is q.overdue)
                and (needle is None or (r.error is not None and needle in _error_text(r.error)))
            )

        versions = None if q.versions is None else set(q.versions)
        needle = None if q.error_text is None else q.error_text.lower()
        now = self._clock()
        found = [r for r in self._executions.values() if match(r)]
        total = len(found)
        if q.after is not None:
            after = (q.after[0], q.after[1].bytes)
            found = [r for r in found if _created_order(r) < after]
        found.sort(key=_created_order, reverse=True)
        page = found[q.offset : q.offset + q.limit]
        if q.count_limit is not None:
            total = min(total, q.count_limit)
        return QueryResult(rows=[_copy_record(r) for r in page], total=total)

    async def outbox_backlog(self) -> OutboxBacklog:
        """Unsent outbox rows and the age of the oldest; see `SupportsOutboxBacklog`."""
        oldest = min((row.record.created_at for row in self._unsent.values()), default=None)
        return backlog(len(self._unsent), oldest, self._clock())

    async def count_by_status(self) -> dict[SagaStatus, int]:
        """Executions per status; statuses with none are omitted."""
        counts: dict[SagaStatus, int] = {}
        for r in self._executions.values():
            counts[r.status] = counts.get(r.status, 0) + 1
        return counts

    async def count_by_definition(self) -> dict[tuple[str, int, SagaStatus], int]:
        """Executions per ``(name, definition version, status)``; combinations with none are omitted."""
        counts: dict[tuple[str, int, SagaStatus], int] = {}
        for r in self._executions.values():
            key = (r.name, r.definition_version, r.status)
            counts[key] = counts.get(key, 0) + 1
        return counts

    # -- recovery --------------------------------------------------------------------------------------

    async def get_sagas_for_recovery(
        self,
        limit: int,
        max_recovery_attempts: int = 5,
        stale_after_seconds: int | None = None,
        saga_name: str | None = None,
    ) -> list[uuid.UUID]:
        """Ids to recover, oldest ``updated_at`` first; see `SagaStorage.get_sagas_for_recovery`."""
        found = self._recovery_candidates(max_recovery_attempts, stale_after_seconds, saga_name)
        return [r.id for r in found[:limit]]

    async def increment_recovery_attempts(
        self, saga_id: uuid.UUID, new_status: SagaStatus | None = None
    ) -> None:
        """Add one to ``recovery_attempts`` and optionally set the status."""
        current = self._get(saga_id)
        self._touch(
            current,
            recovery_attempts=current.recovery_attempts + 1,
            status=current.status if new_status is None else new_status,
        )

    async def set_recovery_attempts(self, saga_id: uuid.UUID, attempts: int) -> None:
        """Set ``recovery_attempts`` (0 re-enables recovery; the maximum excludes the execution)."""
        self._touch(self._get(saga_id), recovery_attempts=attempts)

    # -- claims ----------------------------------------------------------------------------------------

    async def claim(self, saga_id: uuid.UUID, owner: str, *, lease_seconds: float) -> ExecutionRecord | None:
        """Take or keep the claim; ``None`` if another owner's lease is live. See `SagaStorage.claim`."""
        current = self._get(saga_id)
        now = self._clock()
        if not self._claimable(current, owner, now):
            return None
        stored = self._touch(current, owner=owner, lease_until=now + timedelta(seconds=lease_seconds))
        return _copy_record(stored)

    async def claim_many(
        self, ids: Sequence[uuid.UUID], owner: str, *, lease_seconds: float
    ) -> list[ExecutionRecord]:
        """`claim` of several executions at once; see `SupportsClaimMany`."""
        claimed = []
        for saga_id in dict.fromkeys(ids):
            if saga_id not in self._executions:
                continue
            record = await self.claim(saga_id, owner, lease_seconds=lease_seconds)
            if record is not None:
                claimed.append(record)
        return claimed

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
        """Claim up to ``limit`` recoverable, unclaimed executions; see `SagaStorage.claim_for_recovery`."""
        now = self._clock()
        lease_until = now + timedelta(seconds=lease_seconds)
        claimed: list[ExecutionRecord] = []
        for r in self._recovery_candidates(max_recovery_attempts, stale_after_seconds, saga_name):
            if len(claimed) >= limit:
                break
            # Only rows nobody holds (or whose lease ran out): a worker's own live claims are its business.
            if r.owner is None or r.lease_until is None or r.lease_until < now:
                claimed.append(_copy_record(self._touch(r, owner=owner, lease_until=lease_until)))
        return claimed

    async def renew_claim(self, saga_id: uuid.UUID, owner: str, *, lease_seconds: float) -> bool:
        """Extend ``owner``'s lease without bumping the version; ``False`` if it no longer holds the claim."""
        current = self._get(saga_id)
        if current.owner != owner:
            return False
        lease_until = self._clock() + timedelta(seconds=lease_seconds)
        self._executions[saga_id] = dataclasses.replace(current, lease_until=lease_until)
        return True

    async def release_claim(self, saga_id: uuid.UUID, owner: str) -> None:
        """Drop ``owner``'s claim; a no-op if someone else (or no one) holds it."""
        current = self._get(saga_id)
        if current.owner == owner:
            self._touch(current, owner=None, lease_until=None)

    # -- replies ---------------------------------------------------------------------------------------

    async def record_reply(self, reply: ReplyRecord) -> None:
        """Record a reply for the audit trail; an ``applied`` one is deduplicated like in `save`."""
        self._check_reply(reply)
        self._add_reply(reply, self._clock())

    async def list_replies(self, saga_id: uuid.UUID) -> list[ReplyRecord]:
        """Every reply recorded for an execution, in arrival order."""
        return list(self._replies.get(saga_id, ()))

    # -- outbox ----------------------------------------------------------------------------------------

    async def fetch_outbox(
        self, limit: int = 100, *, owner: str | None = None, lease_seconds: float = 30.0
    ) -> list[OutboxRecord]:
        """Claim up to ``limit`` due, current unsent rows, oldest first, for ``lease_seconds``."""
        now = self._clock()
        until = now + timedelta(seconds=lease_seconds)
        executions = self._executions
        fetched: list[OutboxRecord] = []
        for row in self._unsent.values():  # insertion order is id order
            if len(fetched) >= limit:
                break
            if row.claimed_until is not None and row.claimed_until >= now:
                continue
            r = row.record
            if r.request_id is not None:
                execution = executions.get(r.execution_id)
                if execution is None or execution.awaiting_request != r.request_id:
                    continue  # its execution moved past the request: never published
            row.claimed_by, row.claimed_until = owner, until
            # Headers are the one mutable part: the caller gets its own copy.
            fetched.append(
                OutboxRecord(
                    r.id,
                    r.execution_id,
                    r.topic,
                    r.key,
                    r.value,
                    dict(r.headers),
                    r.created_at,
                    r.request_id,
                    row.attempts,
                )
            )
        return fetched

    async def list_outbox(self, saga_id: uuid.UUID) -> list[OutboxRecord]:
        """Every outbox row of one execution, sent or not, oldest first; see `SupportsListOutbox`."""
        return [
            dataclasses.replace(row.record, headers=dict(row.record.headers))
            for row in self._outbox.values()
            if row.record.execution_id == saga_id
        ]

    async def mark_outbox_sent(self, ids: Sequence[int]) -> None:
        """Mark rows as published so no relay fetches them again."""
        now = self._clock()
        unsent = self._unsent
        for row_id in ids:
            row = unsent.get(row_id)
            if row is not None:
                row.sent_at = now
                self._done(row)

    async def defer_outbox(self, delays: Mapping[int, float]) -> None:
        """Release rows that failed transiently, each due again after its delay; see
        `SupportsOutboxOutcomes`."""
        now = self._clock()
        for row_id, delay in delays.items():
            row = self._unsent.get(row_id)
            if row is not None:
                row.attempts += 1
                row.claimed_by, row.claimed_until = None, now + timedelta(seconds=delay)

    async def reject_outbox(self, errors: Mapping[int, Mapping[str, Any]]) -> None:
        """Mark rows refused for good, with their errors; see `SupportsOutboxOutcomes`."""
        now = self._clock()
        for row_id, error in errors.items():
            row = self._outbox.get(row_id)
            if row is not None:
                row.sent_at = row.sent_at or now
                row.outcome, row.error = "rejected", _copy_mapping(error)
                self._done(row)

    async def database_time(self) -> datetime:
        """The storage's clock (the one every write and comparison uses); see `SupportsDatabaseTime`."""
        return self._clock()

    def outbox_outcomes(
        self, execution_id: uuid.UUID
    ) -> list[tuple[int, str | None, Mapping[str, Any] | None]]:
        """Test helper: ``(id, outcome, error)`` of every outbox row of an execution, oldest first;
        outcome ``sent``, ``cancelled``, ``rejected`` or ``None`` (unsent)."""
        out = []
        for row in self._outbox.values():
            if row.record.execution_id == execution_id:
                outcome = row.outcome or ("sent" if row.sent_at is not None else None)
                out.append((row.record.id, outcome, row.error))
        return out

    # -- participant side ------------------------------------------------------------------------------

    async def get_command_reply(self, idempotency_key: str) -> bytes | None:
        """The stored reply of a command already handled under this key."""
        return self._command_replies.get(idempotency_key)

    async def put_command_reply(self, idempotency_key: str, reply: bytes) -> None:
        """Remember a command's reply; the first write wins."""
        self._command_replies.setdefault(idempotency_key, reply)
