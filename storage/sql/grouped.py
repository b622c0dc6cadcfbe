"""Saves made while the database is busy go out together, as one statement (PostgreSQL).

Why: with many executions in flight, each save that runs as a statement of its own pays the client's
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

Each save keeps its own outcome:

* its stored record (version, timestamps, claim) and its outbox ids, as a save of its own reports them;
* `ConcurrencyError` or `ExecutionNotFoundError` when it matched no row (told apart by the same follow-up
  ``SELECT`` as a single save), while the others in the group are written;
* a duplicate applied reply aborts the group's statement: every save of that group is then written on its
  own on the same connection, so only the one with the duplicate fails (`DuplicateReplyError`);
* a failure of the statement or the connection fails every save of the group with the same error.

The group's statement is one transaction: its saves become durable together, with one WAL flush.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from storage.records import ExecutionRecord, OutboxClaim, OutboxMessage, ReplyRecord
from storage.sql import codec
from storage.sql.connections import INTEGRITY_ERRORS, ConnectionHolder, ErrorTranslator
from storage.sql.sessions import Session
from storage.sql.statements import Statements

__all__ = ["GroupedSaves", "SaveRequest", "stored_record"]

#: Most saves written by one statement; more wait for the next group.
MAX_GROUP = 100


@dataclass(slots=True)
class SaveRequest:
    """One ``save`` call's arguments."""

    record: ExecutionRecord
    outbox: Sequence[OutboxMessage] = ()
    reply: ReplyRecord | None = None
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


class GroupedSaves:
    """Gathers the saves made while the database is busy and writes each gathering as one statement.

    Args:
        db: The storage's connections.
        statements: The storage's statements (``save_many``, ``version_of``).
        guard: A fresh error translator for a save (driver errors become `StorageError`s).
        save_one: Writes one save on a session, as the storage does without grouping.
        conflict: Raises the right error for a save that matched no row.
    """

    def __init__(
        self,
        db: ConnectionHolder,
        statements: Statements,
        *,
        guard: Callable[[], ErrorTranslator],
        save_one: Callable[[Session, SaveRequest], Awaitable[ExecutionRecord]],
        conflict: Callable[[Session, ExecutionRecord], Awaitable[None]],
    ) -> None:
        self._db = db
        self._statements = statements
        self._guard = guard
        self._save_one = save_one
        self._conflict = conflict
        self._queue: list[tuple[SaveRequest, asyncio.Future[ExecutionRecord]]] = []
        #: Whether a group's task is waiting for a connection (the next saves join its group).
        self._gathering = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def save(self, request: SaveRequest) -> ExecutionRecord:
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
        group: list[tuple[SaveRequest, asyncio.Future[ExecutionRecord]]] = []
        try:
            with self._guard():
                async with self._db.connect() as session:
                    self._gathering = False
                    group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
                    if self._queue:  # more than one statement's worth: the rest start the next group
                        self._start_group()
                    await self._write(session, group)
        except BaseException as exc:
            if not group:  # no connection: whatever waits now fails with it (later saves start anew)
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

    async def _write(
        self, session: Session, group: list[tuple[SaveRequest, asyncio.Future[ExecutionRecord]]]
    ) -> None:
        ids = [request.record.id for request, _ in group]
        if len(group) == 1 or len(set(ids)) != len(ids):
            await self._one_by_one(session, group)
            return
        try:
            rows = await session.all(self._statements.save_many(), _params(group))
        except INTEGRITY_ERRORS:  # a duplicate applied reply: find it by writing each on its own
            await self._one_by_one(session, group)
            return
        written = {codec.as_uuid(row[0]): row for row in rows}
        for request, future in group:
            row = written.get(request.record.id)
            if row is not None:
                outbox_ids = list(row[-1]) if request.outbox else []
                _settle(future, stored_record(request.record, row[1:], outbox_ids, request.outbox_claim))
                continue
            try:
                with self._guard():
                    await self._conflict(session, request.record)
            except Exception as exc:
                _settle(future, exc)

    async def _one_by_one(
        self, session: Session, group: list[tuple[SaveRequest, asyncio.Future[ExecutionRecord]]]
    ) -> None:
        for request, future in group:
            try:
                with self._guard():
                    stored = await self._save_one(session, request)
            except Exception as exc:
                _settle(future, exc)
            else:
                _settle(future, stored)


def _settle(future: asyncio.Future[ExecutionRecord], outcome: ExecutionRecord | BaseException) -> None:
    if future.done():  # the caller gave up (cancelled); the write stands, as a single save's would
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _params(group: list[tuple[SaveRequest, asyncio.Future[ExecutionRecord]]]) -> dict[str, Any]:
    """The group's values as one array per column (see `combined_save_many`), built by the same codec as
    a single save's, so both write the same values (a save that drops the claim clears the lease too)."""
    requests = [request for request, _ in group]
    executions = [codec.save_params(r.record) for r in requests]
    params = _columns(executions, list(executions[0]))  # a group has two saves or more
    replies = [codec.reply_params(r.reply, prefix="p_reply_") for r in requests if r.reply is not None]
    params.update(_columns(replies, _REPLY_PARAMS))
    outbox = [m for r in requests for m in r.outbox]
    params.update(codec.outbox_arrays(outbox))
    execution_ids: list[Any] = []
    owners: list[str | None] = []
    leases: list[timedelta | None] = []
    for request in requests:
        claim, count = request.outbox_claim, len(request.outbox)
        execution_ids += [request.record.id] * count
        owners += [None if claim is None else claim.owner] * count
        leases += [None if claim is None else timedelta(seconds=claim.lease_seconds)] * count
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
