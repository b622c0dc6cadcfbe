"""Saves, and creates, made while the database is busy go out together, one statement per group (PostgreSQL).

Why: with many executions in flight, each write that runs as a statement of its own pays the client's
bind-encode-send-parse round trip and the server's parse, execute and commit, and on a machine where the
client, PostgreSQL and Kafka share the cores that CPU is what limits throughput. Replies fetched together
are applied together, so their saves arrive in bursts. Once two statements are running on the storage's
connections (or all of them, with a pool of one), a save joins a group instead of taking a connection of
its own: the group's task starts on the next turn of the event loop, takes a connection (waiting for one
like any statement when all are busy), takes every save gathered by then and writes them with
`storage.sql.combined.combined_save_many`. A save made while the database is idle or nearly so (one saga
at a time) goes out alone at once, so a run one at a time waits for nothing new; under load a save waits
at most the rest of a loop turn more than before. In the remote benchmark at 50 sagas in flight the
statements per saga fell from 3.7 (grouping only when every connection was busy) to 1.6.

Creates group the same way, in groups of their own (`combined_create_many`): once saves shared
statements, the creates of new sagas, each an ``INSERT`` of the execution with its first command, were
left as one statement, round trip and commit apiece: in the benchmark at 500 sagas in flight, four
statements in five, and 8% of the client's CPU in its profile.

Each write keeps its own outcome:

* its stored record (version, timestamps, claim) and its outbox ids, as a write of its own reports them;
* a save that matched no row fails alone with `ConcurrencyError` or `ExecutionNotFoundError` (told apart
  by the same follow-up ``SELECT`` as a single save), while the others in the group are written;
* a create whose id or idempotency key is taken is skipped by the group's ``INSERT ... ON CONFLICT DO
  NOTHING`` and then written on its own on the same connection, so it fails alone with the single
  create's `ConcurrencyError` or `DuplicateIdempotencyKeyError`;
* a duplicate applied reply aborts the group's statement: every save of that group is then written on its
  own on the same connection, so only the one with the duplicate fails (`DuplicateReplyError`);
* a group whose members share an execution id (or, for creates, an idempotency key) is written one by one,
  in the order of the calls, as without grouping;
* a failure of the statement or the connection fails every write of the group with the same error.

The group's statement is one transaction: its writes become durable together, with one WAL flush.
"""

from __future__ import annotations

import asyncio
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeAlias, TypeVar

from storage.records import ExecutionRecord, OutboxClaim, OutboxMessage, ReplyRecord
from storage.sql import codec
from storage.sql.connections import INTEGRITY_ERRORS, ConnectionHolder, ErrorTranslator
from storage.sql.sessions import Session
from storage.sql.statements import Statements

__all__ = [
    "CreateRequest",
    "GroupedCreates",
    "GroupedSaves",
    "SaveRequest",
    "created_record",
    "stored_record",
]

#: Most writes of one kind written by one statement; more wait for the next group.
MAX_GROUP = 100


class _Request(Protocol):
    """What every grouped write carries: the execution, its outbox rows and their claim."""

    @property
    def record(self) -> ExecutionRecord: ...

    @property
    def outbox(self) -> Sequence[OutboxMessage]: ...

    @property
    def outbox_claim(self) -> OutboxClaim | None: ...


RequestT = TypeVar("RequestT", bound=_Request)

#: The writes of one group, each with the future its caller waits on.
_Group: TypeAlias = list[tuple[RequestT, asyncio.Future[ExecutionRecord]]]


@dataclass(slots=True)
class SaveRequest:
    """One ``save`` call's arguments."""

    record: ExecutionRecord
    outbox: Sequence[OutboxMessage] = ()
    reply: ReplyRecord | None = None
    outbox_claim: OutboxClaim | None = None


@dataclass(slots=True)
class CreateRequest:
    """One ``create`` call's arguments."""

    record: ExecutionRecord
    outbox: Sequence[OutboxMessage] = ()
    outbox_claim: OutboxClaim | None = None


def stored_record(
    record: ExecutionRecord, row: Sequence[Any], ids: list[int], claim: OutboxClaim | None
) -> ExecutionRecord:
    """``record`` as stored: the storage-owned fields from ``row`` (version, updated_at, owner, lease_until,
    created_at, in that order); the outbox ids, committed now, handed to ``claim``."""
    if claim is not None:
        claim.ids.extend(ids)
    return dataclasses.replace(
        record, version=row[0], updated_at=row[1], owner=row[2], lease_until=row[3], created_at=row[4]
    )


def created_record(
    record: ExecutionRecord, row: Sequence[Any], ids: list[int], claim: OutboxClaim | None
) -> ExecutionRecord:
    """``record`` as created: version 1 and the timestamps from ``row`` (created_at, updated_at, in that
    order); the outbox ids, committed now, handed to ``claim``."""
    if claim is not None:
        claim.ids.extend(ids)
    return dataclasses.replace(record, version=1, created_at=row[0], updated_at=row[1])


class _Grouped(ABC, Generic[RequestT]):
    """Gathers the writes of one kind made while the database is busy and writes each gathering as one
    statement; the subclass says how (`_write`).

    Args:
        db: The storage's connections.
        statements: The storage's statements.
        guard: A fresh error translator for a write (driver errors become `StorageError`s).
        write_one: Writes one request on a session, as the storage does without grouping.
        missing: Settles on a session a request that the group's statement did not write (returns its
            record, or raises its error).
    """

    def __init__(
        self,
        db: ConnectionHolder,
        statements: Statements,
        *,
        guard: Callable[[], ErrorTranslator],
        write_one: Callable[[Session, RequestT], Awaitable[ExecutionRecord]],
        missing: Callable[[Session, RequestT], Awaitable[ExecutionRecord]],
    ) -> None:
        self._db = db
        self._statements = statements
        self._guard = guard
        self._write_one = write_one
        self._missing = missing
        self._queue: _Group[RequestT] = []
        #: Whether a group's task is waiting for a connection (the next writes join its group).
        self._gathering = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def write(self, request: RequestT) -> ExecutionRecord:
        """Write ``request``: at once on a connection of its own while the database is idle or nearly so,
        else in the group being gathered."""
        if self._db.busy():
            return await self.join(request)
        with self._guard():
            async with self._db.connect() as session:
                return await self._write_one(session, request)

    async def join(self, request: RequestT) -> ExecutionRecord:
        """Join the group being gathered (starting one if none is) and wait for its outcome."""
        future: asyncio.Future[ExecutionRecord] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        if not self._gathering:
            self._start_group()
        return await future

    def _start_group(self) -> None:
        self._gathering = True
        task = asyncio.get_running_loop().create_task(self._write_group())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_group(self) -> None:
        group: _Group[RequestT] = []
        try:
            with self._guard():
                async with self._db.connect() as session:
                    self._gathering = False
                    group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
                    if self._queue:  # more than one statement's worth: the rest start the next group
                        self._start_group()
                    await self._write(session, group)
        except BaseException as exc:
            if not group:  # no connection: whatever waits now fails with it (later writes start anew)
                self._gathering = False
                group, self._queue = self._queue, []
            for _, future in group:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
            if not isinstance(exc, Exception):
                raise

    @abstractmethod
    async def _write(self, session: Session, group: _Group[RequestT]) -> None:
        """Write ``group`` on ``session`` and settle every future of it; an error raised fails them all."""

    async def _settle_rows(
        self,
        session: Session,
        group: _Group[RequestT],
        rows: Sequence[Sequence[Any]],
        stored: Callable[[RequestT, Sequence[Any]], ExecutionRecord],
    ) -> None:
        """Settle each write with ``stored`` from its row of the group's statement (keyed by the execution id
        in the first column); a write the statement did not return goes to ``missing`` on its own."""
        written = {codec.as_uuid(row[0]): row for row in rows}
        for request, future in group:
            row = written.get(request.record.id)
            if row is None:
                await self._alone(session, request, future, self._missing)
            else:
                _settle(future, stored(request, row))

    async def _one_by_one(self, session: Session, group: _Group[RequestT]) -> None:
        for request, future in group:
            await self._alone(session, request, future, self._write_one)

    async def _alone(
        self,
        session: Session,
        request: RequestT,
        future: asyncio.Future[ExecutionRecord],
        write: Callable[[Session, RequestT], Awaitable[ExecutionRecord]],
    ) -> None:
        try:
            with self._guard():
                stored = await write(session, request)
        except Exception as exc:
            _settle(future, exc)
        else:
            _settle(future, stored)


class GroupedSaves(_Grouped[SaveRequest]):
    """The saves made while the database is busy, each gathering written by one `combined_save_many`.

    ``missing`` raises the error of a save that matched no row: not found or stale, told apart by the same
    follow-up ``SELECT`` as a single save.
    """

    async def _write(self, session: Session, group: _Group[SaveRequest]) -> None:
        if len(group) == 1 or _repeats([request.record.id for request, _ in group]):
            await self._one_by_one(session, group)
            return
        try:
            rows = await session.all(self._statements.save_many(), _save_params(group))
        except INTEGRITY_ERRORS:  # a duplicate applied reply: find it by writing each on its own
            await self._one_by_one(session, group)
            return
        await self._settle_rows(session, group, rows, _saved)


class GroupedCreates(_Grouped[CreateRequest]):
    """The creates made while the database is busy, each gathering written by one `combined_create_many`.

    ``missing`` is the single create: a create the statement skipped because its id or idempotency key is
    taken, written on its own, raises that single create's error (or goes in, if the row it conflicted with
    went away meanwhile).
    """

    async def _write(self, session: Session, group: _Group[CreateRequest]) -> None:
        records = [request.record for request, _ in group]
        keys = [r.idempotency_key for r in records if r.idempotency_key is not None]
        if len(group) == 1 or _repeats([r.id for r in records]) or _repeats(keys):
            # Which of two members sharing an id or key goes in is the order of the calls, as without
            # grouping: the first wins, the later ones fail as single creates would.
            await self._one_by_one(session, group)
            return
        rows = await session.all(self._statements.create_many(), _create_params(group))
        await self._settle_rows(session, group, rows, _created)


def _settle(future: asyncio.Future[ExecutionRecord], outcome: ExecutionRecord | BaseException) -> None:
    if future.done():  # the caller gave up (cancelled); the write stands, as a single write's would
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _repeats(values: Sequence[object]) -> bool:
    return len(set(values)) != len(values)


def _outbox_ids(request: _Request, row: Sequence[Any]) -> list[int]:
    # The group's statement ends each row with the execution's outbox ids (NULL when it wrote none).
    return list(row[-1]) if request.outbox else []


def _saved(request: SaveRequest, row: Sequence[Any]) -> ExecutionRecord:
    return stored_record(request.record, row[1:], _outbox_ids(request, row), request.outbox_claim)


def _created(request: CreateRequest, row: Sequence[Any]) -> ExecutionRecord:
    return created_record(request.record, row[1:], _outbox_ids(request, row), request.outbox_claim)


def _save_params(group: _Group[SaveRequest]) -> dict[str, Any]:
    """The group's values as one array per column (see `combined_save_many`), built by the same codec as
    a single save's, so both write the same values (a save that drops the claim clears the lease too)."""
    requests = [request for request, _ in group]
    executions = [codec.save_params(r.record) for r in requests]
    params = _columns(executions, list(executions[0]))  # a group has two saves or more
    replies = [codec.reply_params(r.reply, prefix="p_reply_") for r in requests if r.reply is not None]
    params.update(_columns(replies, _REPLY_PARAMS))
    params.update(_outbox_columns(requests))
    return params


def _create_params(group: _Group[CreateRequest]) -> dict[str, Any]:
    """The group's values as one array per column (see `combined_create_many`), built by the same codec as
    a single create's, so both write the same values."""
    requests = [request for request, _ in group]
    executions = [codec.insert_params(r.record) for r in requests]
    params = _columns(executions, list(executions[0]))  # a group has two creates or more
    params.update(_outbox_columns(requests))
    return params


def _outbox_columns(requests: Sequence[_Request]) -> dict[str, Any]:
    """Every request's outbox rows as one array per column, each row with its execution's id, request id
    and claim (`codec.outbox_claims`: owner and lease, NULL and NULL unclaimed)."""
    execution_ids: list[Any] = []
    messages: list[OutboxMessage] = []
    owners: list[str | None] = []
    leases: list[timedelta | None] = []
    for request in requests:
        outbox = request.outbox
        if not outbox:
            continue
        execution_ids += [request.record.id] * len(outbox)
        messages.extend(outbox)
        row_owners, row_leases = codec.outbox_claims(outbox, request.outbox_claim)
        owners += row_owners
        leases += [None if s is None else timedelta(seconds=s) for s in row_leases]
    params = codec.outbox_arrays(messages, None)
    params.update(p_outbox_execution_ids=execution_ids, p_outbox_owners=owners, p_outbox_leases=leases)
    return params


def _columns(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, list[Any]]:
    """Rows of named parameters turned into one list per name."""
    return {name: [row[name] for row in rows] for name in names}


#: The parameter names of an applied reply (the arrays take the same names; a group may have none).
_REPLY_PARAMS = (
    "p_reply_execution_id",
    "p_reply_request_id",
    "p_reply_status",
    "p_reply_outcome",
    "p_reply_reason",
    "p_reply_received_at",
)
