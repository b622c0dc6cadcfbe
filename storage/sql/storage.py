"""`SqlAlchemySagaStorage`: the `SagaStorage` port on SQLAlchemy 2 Core, for PostgreSQL and SQLite.

One code path for both backends: the same Core statements (`storage.sql.statements`) over portable column
types (`storage.sql.types`), built once per storage and executed through a `Session`
(`storage.sql.sessions`) that runs SQLAlchemy's compiled form of each on the driver. What differs by
backend is confined to where "now" comes from (the PostgreSQL server's clock, the client's on SQLite),
``FOR UPDATE SKIP LOCKED`` in the claiming subqueries (PostgreSQL only; SQLite serialises writers), and the
statement that opens a transaction.

Round trips, because they are the cost (DESIGN §7): ``create`` and ``save`` are one autocommit statement
each, outbox rows and the applied reply included on PostgreSQL (data-modifying CTEs, see
`storage.sql.combined`); SQLite writes those in one explicit transaction instead. On PostgreSQL, saves
made while the database is busy with others go out together, one statement for the lot, and so do
creates (`storage.sql.grouped`). A ``save`` that matched no row spends one more ``SELECT`` to tell "not
found" from "stale version". Claims are a single conditional ``UPDATE ... RETURNING``; so is each
heartbeat.

Fsyncs, the other cost: on PostgreSQL claims, heartbeats, releases and sent-marks commit without waiting for
the WAL flush (``synchronous_commit`` off for their own transaction, set by the statement itself), because
a server crash that loses one of them loses nothing: the reasons are on
`storage.sql.statements.Statements._commit_without_flush`. Every other write is durable when it returns.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, NoReturn, Self

import orjson
from sqlalchemy import URL, Executable, event, func, make_url, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from storage.errors import (
    ConcurrencyError,
    DuplicateIdempotencyKeyError,
    DuplicateReplyError,
    ExecutionAlreadyExistsError,
    ExecutionNotFoundError,
)
from storage.migrate import connect_args, upgrade_async
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
)
from storage.sql import codec
from storage.sql.admin_query import admin_query, backlog_query, outbox_query
from storage.sql.combined import OUTBOX_IDS
from storage.sql.connections import INTEGRITY_ERRORS, ConnectionHolder, ErrorTranslator
from storage.sql.grouped import (
    CreateRequest,
    GroupedCreates,
    GroupedSaves,
    SaveRequest,
    created_record,
    stored_record,
)
from storage.sql.schema import SagaTables, tables
from storage.sql.sessions import Session
from storage.sql.statements import Clock, Statements, recovery_params
from storage.status import SagaStatus

__all__ = ["SqlAlchemySagaStorage"]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run while a writer commits; the busy timeout makes a second process wait for the
    # write lock instead of failing at once.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


def _raise_duplicate_reply(reply: ReplyRecord | None, error: BaseException) -> NoReturn:
    """A unique violation while writing ``reply``: the only unique index it can hit is the applied one's."""
    if reply is not None and reply.outcome == "applied":
        raise DuplicateReplyError(reply.execution_id, reply.request_id) from error
    raise error


class SqlAlchemySagaStorage:
    """`SagaStorage` on PostgreSQL (``postgresql+asyncpg://``) or SQLite (``sqlite+aiosqlite://``).

    Args:
        url: SQLAlchemy async URL. May be omitted when ``engine`` is given.
        echo: Log every statement (SQLAlchemy's ``echo``).
        pool_size: How many connections the storage keeps open, i.e. how many statements run at once.
            SQLite always uses one: it has a single writer anyway, and one connection avoids lock waits.
        auto_migrate: Bring the tables up to date (Alembic ``head``) in `start`.
        engine: Use this engine instead of creating one; the storage then does not dispose it on `stop`.
        schema: PostgreSQL schema holding the tables (set as the connections' ``search_path``); only
            applied to an engine the storage creates.
        clock: SQLite only: the source of "now" for every time the storage writes or compares
            (timezone-aware UTC; default the system clock). PostgreSQL always uses the server's clock.
    """

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        echo: bool = False,
        pool_size: int = 10,
        auto_migrate: bool = True,
        engine: AsyncEngine | None = None,
        schema: str | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if engine is None:
            if url is None:
                raise ValueError("SqlAlchemySagaStorage needs a url or an engine")
            url_text = url if isinstance(url, str) else url.render_as_string(hide_password=False)
            options: dict[str, Any] = {"echo": echo, "json_deserializer": orjson.loads}
            if make_url(url_text).get_backend_name() != "sqlite":
                options.update(pool_size=pool_size, max_overflow=pool_size)
            engine = create_async_engine(url_text, connect_args=connect_args(url_text, schema), **options)
            self._owns_engine = True
        else:
            self._owns_engine = False
        self._engine = engine
        self._dialect = engine.dialect.name
        self._sqlite = self._dialect == "sqlite"
        if self._sqlite and not event.contains(engine.sync_engine, "connect", _sqlite_pragmas):
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        self._url = engine.url.render_as_string(hide_password=True)
        self._auto_migrate = auto_migrate
        self._schema = schema
        self._started = False
        self._tables = tables
        self._clock = Clock(server=not self._sqlite, source=clock)
        self._s = Statements(tables, self._clock, self._dialect)
        self._db = ConnectionHolder(
            engine, 1 if self._sqlite else pool_size, begin_sql="BEGIN IMMEDIATE" if self._sqlite else "BEGIN"
        )
        self._grouped = GroupedSaves(
            self._db,
            self._s,
            guard=lambda: self._guard("save"),
            write_one=self._save_on,
            missing=lambda session, request: self._raise_save_conflict(session, request.record),
        )
        # A create the group's statement skipped is written on its own: that raises its conflict's error.
        self._grouped_creates = GroupedCreates(
            self._db,
            self._s,
            guard=lambda: self._guard("create"),
            write_one=self._create_on,
            missing=self._create_on,
        )

    @property
    def engine(self) -> AsyncEngine:
        """The engine (for migrations, admin queries and tests)."""
        return self._engine

    @property
    def tables(self) -> SagaTables:
        """The Core tables the storage reads and writes."""
        return self._tables

    def __repr__(self) -> str:
        return f"SqlAlchemySagaStorage({self._url!r})"

    def _guard(self, operation: str) -> ErrorTranslator:
        return ErrorTranslator(self._url, operation)

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Migrate the schema to ``head`` if ``auto_migrate`` (once per storage); idempotent."""
        if self._started:
            return
        if self._auto_migrate:
            with self._guard("migrate"):
                await upgrade_async(engine=self._engine, schema=self._schema)
        self._started = True

    async def stop(self) -> None:
        """Close the storage's connections (and its engine, if it created it); idempotent."""
        await self._db.close()
        if self._owns_engine:
            await self._engine.dispose()
        self._started = False

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

    # -- executions ------------------------------------------------------------------------------------

    async def create(
        self,
        record: ExecutionRecord,
        *,
        outbox: Sequence[OutboxMessage] = (),
        outbox_claim: OutboxClaim | None = None,
    ) -> ExecutionRecord:
        """Insert a new execution (``version=1``) and its outbox rows; see `SagaStorage.create`.

        On PostgreSQL a create made while other statements run joins a group, and the group goes out as one
        statement (`storage.sql.grouped`).
        """
        if self._s.combines:
            return await self._grouped_creates.write(CreateRequest(record, outbox, outbox_claim))
        params = codec.insert_params(record)
        params.update(self._clock.params())
        ids: list[int] = []
        with self._guard("create"):
            try:
                if not outbox:
                    async with self._db.connect() as session:
                        row = await session.first(self._s.insert_execution, params)
                else:
                    async with self._db.transaction() as session:
                        row = await session.first(self._s.insert_execution, params)
                        ids = await self._insert_outbox(session, record.id, outbox, outbox_claim)
            except INTEGRITY_ERRORS as error:
                async with self._db.connect() as session:
                    await self._raise_create_conflict(session, record, error)
        assert row is not None
        return created_record(record, row, ids, outbox_claim)

    async def _create_on(self, session: Session, request: CreateRequest) -> ExecutionRecord:
        """One create as one statement on ``session`` (PostgreSQL): the execution and its outbox rows."""
        record, outbox = request.record, request.outbox
        params = codec.insert_params(record)
        params.update(self._clock.params())
        statement: Executable = self._s.insert_execution
        if outbox:
            params.update(self._outbox_params(outbox, request.outbox_claim))
            statement = self._s.create_combined()
        try:
            row = await session.first(statement, params)
        except INTEGRITY_ERRORS as error:
            await self._raise_create_conflict(session, record, error)
        assert row is not None
        return created_record(record, row, list(row[OUTBOX_IDS]) if outbox else [], request.outbox_claim)

    async def _raise_create_conflict(
        self, session: Session, record: ExecutionRecord, error: BaseException
    ) -> NoReturn:
        if record.idempotency_key is not None:
            found = await session.first(self._s.id_by_idempotency_key, {"p_key": record.idempotency_key})
            if found is not None:
                raise DuplicateIdempotencyKeyError(
                    record.idempotency_key,
                    codec.as_uuid(found[0]),
                    existing_saga=found[1],
                    saga=record.name,
                ) from error
        # Otherwise the primary key: the caller expected no execution with this id (version 0).
        raise ExecutionAlreadyExistsError(record.id) from error

    def _outbox_params(self, outbox: Sequence[OutboxMessage], claim: OutboxClaim | None) -> dict[str, Any]:
        """The outbox rows' parameters for a one-statement write (PostgreSQL), one array per column."""
        return codec.outbox_arrays(outbox, claim)

    async def _insert_outbox(
        self,
        session: Session,
        execution_id: uuid.UUID,
        outbox: Sequence[OutboxMessage],
        claim: OutboxClaim | None,
    ) -> list[int]:
        """Insert the rows (one executemany), or with a claim one ``INSERT ... RETURNING id`` per row.

        Each row carries its claim as `codec.outbox_claims` gives it (a delayed row is unclaimed and not
        due before its delay).
        """
        rows = codec.outbox_params(execution_id, outbox)
        owners, leases = codec.outbox_claims(outbox, claim)
        for row, owner, lease in zip(rows, owners, leases, strict=True):
            row.update(self._clock.params(lease=lease) if lease is not None else self._clock.params())
            row.setdefault("p_lease", None)
            row["p_owner"] = owner
        if claim is None:
            await session.run_many(self._s.insert_outbox, rows)
            return []
        ids: list[int] = []
        for row in rows:
            inserted = await session.first(self._s.insert_outbox, row)
            assert inserted is not None
            ids.append(int(inserted[0]))
        return ids

    async def load(self, saga_id: uuid.UUID) -> ExecutionRecord:
        """Return the stored execution; see `SagaStorage.load`."""
        with self._guard("load"):
            async with self._db.connect() as session:
                row = await session.first(self._s.load, {"p_id": saga_id})
        if row is None:
            raise ExecutionNotFoundError(saga_id)
        return codec.execution_from_row(row)

    async def load_many(self, ids: Sequence[uuid.UUID]) -> list[ExecutionRecord]:
        """The stored executions among ``ids`` in one ``SELECT``, in their order, each once; unknown ids are
        absent. See `SupportsLoadMany`."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return []
        with self._guard("load_many"):
            async with self._db.connect() as session:
                rows = await session.all(self._s.load_many, {"p_ids": wanted})
        found = {r.id: r for r in map(codec.execution_from_row, rows)}
        return [found[i] for i in wanted if i in found]

    async def find_by_idempotency_key(self, idempotency_key: str) -> ExecutionRecord | None:
        """Return the execution started with this key, if any."""
        with self._guard("find_by_idempotency_key"):
            async with self._db.connect() as session:
                row = await session.first(self._s.by_idempotency_key, {"p_key": idempotency_key})
        return None if row is None else codec.execution_from_row(row)

    async def save(
        self,
        record: ExecutionRecord,
        *,
        outbox: Sequence[OutboxMessage] = (),
        reply: ReplyRecord | None = None,
        outbox_claim: OutboxClaim | None = None,
    ) -> ExecutionRecord:
        """Optimistic write of state, outbox and applied reply, all or nothing; see `SagaStorage.save`.

        On PostgreSQL a save made while other statements run joins a group, and the group goes out as one
        statement (`storage.sql.grouped`).
        """
        if self._s.combines:
            return await self._grouped.write(SaveRequest(record, outbox, reply, outbox_claim))
        params = codec.save_params(record)
        params.update(self._clock.params())
        ids: list[int] = []
        with self._guard("save"):
            async with self._db.transaction() as session:
                row = await session.first(self._s.save, params)
                if row is None:
                    await self._raise_save_conflict(session, record)
                await session.run(self._s.cancel_moved_past, params)
                if reply is not None:
                    await self._insert_reply(session, reply)
                if outbox:
                    ids = await self._insert_outbox(session, record.id, outbox, outbox_claim)
        assert row is not None
        return stored_record(record, row, ids, outbox_claim)

    async def _save_on(self, session: Session, request: SaveRequest) -> ExecutionRecord:
        """One save as one statement on ``session`` (PostgreSQL): execution, reply row and outbox rows."""
        record, outbox, reply = request.record, request.outbox, request.reply
        params = codec.save_params(record)
        params.update(self._clock.params())
        # Always the combined form: every save cancels the commands of requests it moved past.
        if reply is not None:
            params.update(codec.reply_params(reply, prefix="p_reply_"))
        if outbox:
            params.update(self._outbox_params(outbox, request.outbox_claim))
        statement: Executable = self._s.save_combined(reply=reply is not None, outbox=bool(outbox))
        try:
            row = await session.first(statement, params)
        except INTEGRITY_ERRORS as error:
            _raise_duplicate_reply(reply, error)
        if row is None:
            await self._raise_save_conflict(session, record)
        assert row is not None
        return stored_record(record, row, list(row[OUTBOX_IDS]) if outbox else [], request.outbox_claim)

    async def _raise_save_conflict(self, session: Session, record: ExecutionRecord) -> NoReturn:
        if await session.first(self._s.version_of, {"p_id": record.id}) is None:
            raise ExecutionNotFoundError(record.id)
        raise ConcurrencyError(record.id, record.version)

    async def _insert_reply(self, session: Session, reply: ReplyRecord) -> None:
        params = codec.reply_params(reply)
        params.update(self._clock.params())
        try:
            await session.run(self._s.insert_reply, params)
        except INTEGRITY_ERRORS as error:
            _raise_duplicate_reply(reply, error)

    async def get_steps(self, saga_id: uuid.UUID) -> list[StepRecord]:
        """Step history, oldest first; see `SagaStorage.get_steps`."""
        return list((await self.load(saga_id)).steps)

    async def query(self, query: ExecutionQuery | None = None) -> QueryResult:
        """Filtered page of executions, newest first, with the total; see `SagaStorage.query`."""
        page, total, params = admin_query(self._tables.executions, self._clock, query or ExecutionQuery())
        with self._guard("query"):
            async with self._db.connect() as session:
                rows = await session.sa_all(page, params)
                ((count,),) = await session.sa_all(total, params)
        return QueryResult(rows=[codec.execution_from_row(r) for r in rows], total=count)

    async def outbox_backlog(self) -> OutboxBacklog:
        """Unsent outbox rows and the age of the oldest; see `SupportsOutboxBacklog`."""
        page, params = backlog_query(self._tables.outbox, self._clock)
        with self._guard("outbox_backlog"):
            async with self._db.connect() as session:
                ((count, oldest, now),) = await session.sa_all(page, params)
        return backlog(int(count), oldest, now)

    async def count_by_status(self) -> dict[SagaStatus, int]:
        """Executions per status; statuses with none are omitted."""
        with self._guard("count_by_status"):
            async with self._db.connect() as session:
                rows = await session.all(self._s.count_by_status)
        return {SagaStatus(status): count for status, count in rows}

    async def count_by_definition(self) -> dict[tuple[str, int, SagaStatus], int]:
        """Executions per ``(name, definition version, status)``; combinations with none are omitted."""
        t = self._tables.executions
        stmt = select(t.c.name, t.c.definition_version, t.c.status, func.count()).group_by(
            t.c.name, t.c.definition_version, t.c.status
        )
        with self._guard("count_by_definition"):
            async with self._db.connect() as session:
                rows = await session.all(stmt)
        return {(name, int(version), SagaStatus(status)): count for name, version, status, count in rows}

    # -- recovery --------------------------------------------------------------------------------------

    async def get_sagas_for_recovery(
        self,
        limit: int,
        max_recovery_attempts: int = 5,
        stale_after_seconds: int | None = None,
        saga_name: str | None = None,
    ) -> list[uuid.UUID]:
        """Ids to recover, oldest ``updated_at`` first; see `SagaStorage.get_sagas_for_recovery`."""
        flt, params = recovery_params(
            self._clock,
            limit=limit,
            max_recovery_attempts=max_recovery_attempts,
            stale_after_seconds=stale_after_seconds,
            saga_name=saga_name,
        )
        with self._guard("get_sagas_for_recovery"):
            async with self._db.connect() as session:
                rows = await session.all(self._s.recovery_ids(flt), params)
        return [codec.as_uuid(r[0]) for r in rows]

    async def _update_one(self, operation: str, statement: Any, params: dict[str, Any]) -> bool:
        """Run a single-row ``UPDATE ... RETURNING id``; whether it matched."""
        params.update(self._clock.params())
        with self._guard(operation):
            async with self._db.connect() as session:
                return await session.first(statement, params) is not None

    async def _require(self, saga_id: uuid.UUID) -> None:
        with self._guard("load"):
            async with self._db.connect() as session:
                found = await session.first(self._s.version_of, {"p_id": saga_id})
        if found is None:
            raise ExecutionNotFoundError(saga_id)

    async def increment_recovery_attempts(
        self, saga_id: uuid.UUID, new_status: SagaStatus | None = None
    ) -> None:
        """Add one to ``recovery_attempts`` (and set the status) in one statement."""
        if new_status is None:
            matched = await self._update_one("increment", self._s.increment_attempts, {"p_id": saga_id})
        else:
            matched = await self._update_one(
                "increment",
                self._s.increment_attempts_status,
                {"p_id": saga_id, "p_status": SagaStatus(new_status).value},
            )
        if not matched:
            raise ExecutionNotFoundError(saga_id)

    async def set_recovery_attempts(self, saga_id: uuid.UUID, attempts: int) -> None:
        """Set ``recovery_attempts`` (0 re-enables recovery; the maximum excludes the execution)."""
        params = {"p_id": saga_id, "p_attempts": attempts}
        if not await self._update_one("set_recovery_attempts", self._s.set_attempts, params):
            raise ExecutionNotFoundError(saga_id)

    # -- claims ----------------------------------------------------------------------------------------

    async def claim(self, saga_id: uuid.UUID, owner: str, *, lease_seconds: float) -> ExecutionRecord | None:
        """Conditional ``UPDATE`` taking the claim; ``None`` if another owner's lease is live.

        Commits without waiting for the WAL flush on PostgreSQL: the holder's next save, durable, makes the
        claim durable too, and if a server crash lost the claim first, that save is version-checked against
        the row as it was before the claim (see `Statements._commit_without_flush`).
        """
        params = self._clock.params(lease=lease_seconds)
        params.update(p_id=saga_id, p_owner=owner)
        with self._guard("claim"):
            async with self._db.connect() as session:
                row = await session.first(self._s.claim, params)
                if row is None:
                    if await session.first(self._s.version_of, {"p_id": saga_id}) is None:
                        raise ExecutionNotFoundError(saga_id)
                    return None
        return codec.execution_from_row(row)

    async def claim_many(
        self, ids: Sequence[uuid.UUID], owner: str, *, lease_seconds: float
    ) -> list[ExecutionRecord]:
        """`claim` of several executions in one ``UPDATE``; see `SupportsClaimMany`.

        Commits without waiting for the WAL flush on PostgreSQL, for the reasons `claim` gives.
        """
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return []
        params = self._clock.params(lease=lease_seconds)
        params.update(p_ids=wanted, p_owner=owner)
        with self._guard("claim_many"):
            async with self._db.connect() as session:
                rows = await session.all(self._s.claim_many, params)
        found = {r.id: r for r in map(codec.execution_from_row, rows)}
        return [found[i] for i in wanted if i in found]

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
        """Claim up to ``limit`` recoverable, unclaimed executions in one statement."""
        flt, params = recovery_params(
            self._clock,
            limit=limit,
            max_recovery_attempts=max_recovery_attempts,
            stale_after_seconds=stale_after_seconds,
            saga_name=saga_name,
            extra={"p_owner": owner},
            lease=lease_seconds,
        )
        with self._guard("claim_for_recovery"):
            async with self._db.connect() as session:
                rows = await session.all(self._s.recovery_claim(flt), params)
        return [codec.execution_from_row(r) for r in rows]

    async def renew_claim(self, saga_id: uuid.UUID, owner: str, *, lease_seconds: float) -> bool:
        """Extend ``owner``'s lease (no version bump); ``False`` if it no longer holds the claim.

        Commits without waiting for the WAL flush on PostgreSQL: a renewal lost in a crash only shortens the
        lease, and a claim taken over after that bumps the version, which fences the holder off.
        """
        params = self._clock.params(lease=lease_seconds)
        params.update(p_id=saga_id, p_owner=owner)
        if await self._update_one("renew_claim", self._s.renew, params):
            return True
        await self._require(saga_id)
        return False

    async def release_claim(self, saga_id: uuid.UUID, owner: str) -> None:
        """Drop ``owner``'s claim; a no-op if someone else (or no one) holds it.

        Commits without waiting for the WAL flush on PostgreSQL: a release lost in a crash only keeps the
        row claimed until its lease ends.
        """
        if not await self._update_one("release_claim", self._s.release, {"p_id": saga_id, "p_owner": owner}):
            await self._require(saga_id)

    # -- replies ---------------------------------------------------------------------------------------

    async def record_reply(self, reply: ReplyRecord) -> None:
        """Record a reply for the audit trail; an ``applied`` one is deduplicated like in `save`."""
        with self._guard("record_reply"):
            async with self._db.connect() as session:
                await self._insert_reply(session, reply)

    async def list_replies(self, saga_id: uuid.UUID) -> list[ReplyRecord]:
        """Every reply recorded for an execution, in arrival order."""
        with self._guard("list_replies"):
            async with self._db.connect() as session:
                rows = await session.all(self._s.list_replies, {"p_id": saga_id})
        return [codec.reply_from_row(r) for r in rows]

    # -- outbox ----------------------------------------------------------------------------------------

    async def fetch_outbox(
        self, limit: int = 100, *, owner: str | None = None, lease_seconds: float = 30.0
    ) -> list[OutboxRecord]:
        """Claim up to ``limit`` unsent rows, oldest first, for ``lease_seconds``."""
        params = self._clock.params(lease=lease_seconds)
        params.update(p_limit=limit, p_owner=owner)
        with self._guard("fetch_outbox"):
            async with self._db.connect() as session:
                rows = await session.all(self._s.fetch_outbox, params)
        return sorted((codec.outbox_from_row(r) for r in rows), key=lambda r: r.id)

    async def list_outbox(self, saga_id: uuid.UUID) -> list[OutboxRecord]:
        """Every outbox row of one execution, sent or not, oldest first; see `SupportsListOutbox`."""
        stmt = outbox_query(self._tables.outbox, saga_id)
        with self._guard("list_outbox"):
            async with self._db.connect() as session:
                rows = await session.sa_all(stmt)
        return [codec.outbox_from_row(r) for r in rows]

    async def mark_outbox_sent(self, ids: Sequence[int]) -> None:
        """Mark rows as published so no relay fetches them again.

        Commits without waiting for the WAL flush on PostgreSQL: a mark lost in a crash only makes a relay
        publish the rows again after their lease, and participants drop duplicates by idempotency key.
        """
        if not ids:
            return
        params = self._clock.params()
        params["p_ids"] = list(ids)
        with self._guard("mark_outbox_sent"):
            async with self._db.connect() as session:
                await session.run(self._s.mark_sent, params)

    async def defer_outbox(self, delays: Mapping[int, float]) -> None:
        """Release rows whose publish failed transiently, each due again ``delays[id]`` seconds from the
        database's now, with one more attempt counted; see `SupportsOutboxOutcomes`."""
        if not delays:
            return
        rows = []
        for row_id, delay in delays.items():
            params = self._clock.params(delay=delay)
            params["p_id"] = row_id
            rows.append(params)
        with self._guard("defer_outbox"):
            async with self._db.connect() as session:
                await session.run_many(self._s.defer_outbox, rows)

    async def reject_outbox(self, errors: Mapping[int, Mapping[str, Any]]) -> None:
        """Take rows the broker refuses for good out of the unsent ones, each with its error; see
        `SupportsOutboxOutcomes`."""
        if not errors:
            return
        rows = []
        for row_id, error in errors.items():
            params = self._clock.params()
            params.update(p_id=row_id, p_error=dict(error))
            rows.append(params)
        with self._guard("reject_outbox"):
            async with self._db.connect() as session:
                await session.run_many(self._s.reject_outbox, rows)

    async def database_time(self) -> datetime:
        """The database's current time (PostgreSQL ``clock_timestamp()``; SQLite: the storage's clock, the
        one its statements write); see `SupportsDatabaseTime`."""
        if self._clock.server:
            with self._guard("database_time"):
                async with self._db.connect() as session:
                    row = await session.first(self._s.database_time)
            assert row is not None
            value: datetime = row[0]
            return value
        return self._clock.current()

    # -- participant side ------------------------------------------------------------------------------

    async def get_command_reply(self, idempotency_key: str) -> bytes | None:
        """The stored reply of a command already handled under this key."""
        with self._guard("get_command_reply"):
            async with self._db.connect() as session:
                row = await session.first(self._s.get_command_reply, {"p_key": idempotency_key})
        return None if row is None else bytes(row[0])

    async def put_command_reply(self, idempotency_key: str, reply: bytes) -> None:
        """Remember a command's reply; the first write wins (``INSERT ... ON CONFLICT DO NOTHING``)."""
        params = self._clock.params()
        params.update(p_key=idempotency_key, p_reply=reply)
        with self._guard("put_command_reply"):
            async with self._db.connect() as session:
                await session.run(self._s.put_command_reply, params)
