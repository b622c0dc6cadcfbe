"""`SqlParticipantStore`: claims, stored replies, step tombstones and the reply outbox of a participant.

The store lives in the participant's own database (SQLAlchemy async: PostgreSQL via asyncpg, SQLite via
aiosqlite). A transactional handler runs inside `transaction`, and the same transaction marks its command
done with its reply (`complete`) and queues the reply in the outbox, so the effect, the dedup record and
the reply commit together or not at all.

Claims are rows, not locks: `claim` inserts the command's row with an owner and a lease (on the database's
clock), committed at once so every instance sees it; the owner renews it while the handler runs; another
instance waits for the row to become ``done`` and answers from it, or takes the claim over once its lease
ran out (its owner died). `complete` is conditional on the owner, so a claim taken over is never
completed by the instance that lost it.

The store's statements run on the project's fast path (`storage.sql.connections.ConnectionHolder`):
long-lived autocommit connections, prebuilt Core statements executed on the driver directly, an explicit
``BEGIN`` only for the handler's transaction. SQLite allows one writer at a time: the store then has one
connection, so its transactions run one after the other in this process (a handler's transaction holds
the others up). Several instances need PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from sqlalchemy import (
    event,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql import Executable

from storage.errors import StorageError
from storage.participant.migrate import upgrade_participant_store
from storage.participant.statements import Statements, params
from storage.sql.connections import ConnectionHolder, ErrorTranslator
from storage.sql.sessions import Session

try:
    import asyncpg  # type: ignore[import-untyped]

    _PG_ERRORS: tuple[type[BaseException], ...] = (asyncpg.PostgresError, asyncpg.InterfaceError)
except ImportError:  # pragma: no cover - asyncpg is a dependency
    _PG_ERRORS = ()

#: Errors of the database itself, which the store translates into `StorageError`.
_DB_ERRORS: tuple[type[BaseException], ...] = (sa_exc.SQLAlchemyError, sqlite3.Error, *_PG_ERRORS)

__all__ = ["ClaimResult", "CommandKind", "OutboxRow", "SqlParticipantStore", "StepState", "StoreTransaction"]

#: What a command is to its saga step: the forward command, its compensation, or neither (no pairing).
CommandKind = Literal["forward", "compensate", "plain", "decision"]
#: A saga step's state at this participant.
StepState = Literal["forward", "tombstone", "compensating", "compensated"]


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What `SqlParticipantStore.claim` found.

    Attributes:
        outcome: ``claimed`` (the caller runs the handler), ``done`` (answer from the stored reply) or
            ``busy`` (another instance holds a live claim: wait and ask again).
        reply_status: The stored reply's status when ``done``.
        reply_value: The stored reply's encoded content when ``done``.
        lease_left: Seconds left on the other instance's lease when ``busy``.
    """

    outcome: Literal["claimed", "done", "busy"]
    reply_status: int | None = None
    reply_value: bytes | None = None
    lease_left: float = 0.0


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A committed reply waiting to be published."""

    id: int
    topic: str
    key: bytes | None
    value: bytes
    headers: dict[str, str]


class StoreTransaction:
    """An open transaction of the participant store: the handler's writes and the store's share it.

    Attributes:
        connection: The SQLAlchemy `AsyncConnection` the handler writes through (Core, or an
            `AsyncSession` bound to it); the participant commits or rolls back, never the handler.
    """

    __slots__ = ("session",)

    def __init__(self, session: Session) -> None:
        self.session = session

    @property
    def connection(self) -> AsyncConnection:
        return self.session.conn

    async def execute(self, statement: Executable, parameters: Mapping[str, Any] | None = None) -> Any:
        """Run ``statement`` in the transaction through SQLAlchemy (a `CursorResult`)."""
        return await self.session.conn.execute(statement, dict(parameters) if parameters else None)


class _Through(Exception):
    """Carries an error of the transaction's body past the database error translation."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


class SqlParticipantStore:
    """The participant store on PostgreSQL (``postgresql+asyncpg://``) or SQLite (``sqlite+aiosqlite://``).

    Args:
        url: SQLAlchemy async URL of the participant's database; ignored when ``engine`` is given.
        engine: The participant's own engine, shared with its application code (one engine per process).
        pool_size: Connections the store keeps open (each running handler holds one; SQLite: one).
        auto_migrate: Bring the store's tables up to date (their own Alembic branch) on `start`.
        echo: Log every SQL statement.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        engine: AsyncEngine | None = None,
        pool_size: int = 20,
        auto_migrate: bool = True,
        echo: bool = False,
    ) -> None:
        if engine is None and not url:
            raise ValueError("SqlParticipantStore needs a url or an engine")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self._url = url
        self._engine = engine
        self._own_engine = engine is None
        self._pool_size = pool_size
        self._auto_migrate = auto_migrate
        self._echo = echo
        self._sql: Statements | None = None
        self._holder: ConnectionHolder | None = None
        self._started = False

    @property
    def engine(self) -> AsyncEngine:
        """The engine the store (and its handlers' transactions) use; available after `start`."""
        if self._engine is None:
            raise StorageError("the participant store is not started")
        return self._engine

    @property
    def started(self) -> bool:
        """Whether `start` ran (and `stop` did not since)."""
        return self._started

    @property
    def dialect(self) -> str:
        """``postgresql`` or ``sqlite``."""
        return self.engine.dialect.name

    @property
    def shown_url(self) -> str:
        """The database URL with its password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    async def start(self) -> None:
        """Open the engine (unless one was given) and migrate the tables; idempotent."""
        if self._started:
            return
        if self._engine is None:
            assert self._url is not None
            backend = make_url(self._url).get_backend_name()
            options: dict[str, Any] = {"echo": self._echo}
            if backend == "sqlite":
                if make_url(self._url).database in (None, "", ":memory:"):
                    options["poolclass"] = StaticPool  # one in-memory database, not one per connection
            else:
                options.update(pool_size=self._pool_size, max_overflow=0)
            self._engine = create_async_engine(self._url, **options)
        engine = self._engine
        sqlite = engine.dialect.name == "sqlite"
        if engine.dialect.name not in ("postgresql", "sqlite"):
            raise StorageError(f"participant store: unsupported database {engine.dialect.name!r}")
        if sqlite and not event.contains(engine.sync_engine, "connect", _sqlite_pragmas):
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        self._sql = Statements(engine.dialect.name)
        if self._auto_migrate:
            await upgrade_participant_store(engine)
        self._holder = ConnectionHolder(
            engine, 1 if sqlite else self._pool_size, begin_sql="BEGIN IMMEDIATE" if sqlite else "BEGIN"
        )
        self._started = True

    async def stop(self) -> None:
        """Close the store's connections, and the engine if the store created it; idempotent."""
        holder, self._holder = self._holder, None
        if holder is not None:
            await holder.close()
        if self._started and self._own_engine and self._engine is not None:
            await self._engine.dispose()
            self._engine = None
        self._started = False

    async def __aenter__(self) -> SqlParticipantStore:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- transactions ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreTransaction]:
        """One transaction of the participant's database: committed on exit, rolled back on an error."""
        holder = self._connections()
        try:
            with ErrorTranslator(self.shown_url, "participant transaction"):
                async with holder.transaction() as session:
                    try:
                        yield StoreTransaction(session)
                    except _DB_ERRORS:
                        raise
                    except Exception as exc:
                        # The caller's own error (a publish that failed, ...): rolled back, and raised
                        # as it is rather than as a database error.
                        raise _Through(exc) from exc
        except _Through as through:
            raise through.error from None

    async def _run(self, fn: Callable[[Session], Awaitable[Any]]) -> Any:
        """``fn`` on an autocommit session: each of its statements commits on its own."""
        holder = self._connections()
        with ErrorTranslator(self.shown_url, "participant store"):
            async with holder.connect() as session:
                return await fn(session)

    def _connections(self) -> ConnectionHolder:
        if self._holder is None:
            raise StorageError("the participant store is not started")
        return self._holder

    def _statements(self) -> Statements:
        if self._sql is None:
            raise StorageError("the participant store is not started")
        return self._sql

    # -- claims -----------------------------------------------------------------------------------------

    async def claim(
        self,
        service: str,
        key: str,
        execution_id: str | None = None,
        step: str | None = None,
        *,
        owner: str,
        lease: float,
        kind: CommandKind = "plain",
    ) -> ClaimResult:
        """Claim command ``key`` for ``owner`` for ``lease`` seconds, or say why not (committed at once).

        A claim whose lease ran out, or one ``owner`` already holds, is taken (over).
        """
        sql = self._statements()
        values = params(
            service=service,
            key=key,
            owner=owner,
            lease=lease,
            kind=kind,
            execution_id=execution_id,
            step=step,
        )

        async def run(session: Session) -> ClaimResult:
            if await session.first(sql.claim_insert, values) is not None:
                return ClaimResult("claimed")
            if await session.first(sql.claim_take, values) is not None:
                return ClaimResult("claimed")
            row = await session.first(sql.claim_read, values)
            if row is None:  # released between the statements: the next attempt inserts it
                return ClaimResult("busy")
            if row[0] == "done":
                return ClaimResult("done", row[1], bytes(row[2]))
            return ClaimResult("busy", lease_left=max(0.0, float(row[3] or 0.0)))

        result: ClaimResult = await self._run(run)
        return result

    async def renew(self, service: str, key: str, *, owner: str, lease: float) -> bool:
        """Extend ``owner``'s claim of ``key`` by ``lease`` seconds; ``False`` when it lost the claim."""
        return key in await self.renew_many(service, [key], owner=owner, lease=lease)

    async def renew_many(self, service: str, keys: Sequence[str], *, owner: str, lease: float) -> set[str]:
        """Extend ``owner``'s claims of ``keys`` by ``lease`` seconds in one statement; the keys renewed
        (the others were lost: their leases ran out and another instance took them)."""
        if not keys:
            return set()
        sql = self._statements()
        values = params({"service": service, "keys": list(keys), "owner": owner, "lease": lease})

        async def run(session: Session) -> set[str]:
            return {row[0] for row in await session.all(sql.renew_many, values)}

        renewed: set[str] = await self._run(run)
        return renewed

    async def release(self, service: str, key: str, *, owner: str) -> None:
        """Drop ``owner``'s unfinished claim of ``key`` so another instance may take it at once."""
        sql = self._statements()
        values = params({"service": service, "key": key, "owner": owner})

        async def run(session: Session) -> None:
            await session.run(sql.release, values)

        await self._run(run)

    async def complete(
        self,
        tx: StoreTransaction,
        service: str,
        key: str,
        *,
        owner: str,
        status: int,
        value: bytes,
        reply_topic: str | None,
        reply_key: bytes | None = None,
        reply_value: bytes | None = None,
        reply_headers: Mapping[str, str] | None = None,
    ) -> int | None:
        """In ``tx``: mark ``key`` done with its reply and queue the reply in the outbox.

        Returns:
            The outbox row's id (0 when ``reply_topic`` is ``None``: nothing to send), or ``None`` when
            ``owner`` no longer holds the claim; the caller then rolls the transaction back.
        """
        sql = self._statements()
        session = tx.session
        values = params(service=service, key=key, owner=owner, status=status, value=value)
        if reply_topic is None:
            return None if await session.first(sql.done_returning, values) is None else 0
        values.update(
            params(
                topic=reply_topic,
                mkey=reply_key,
                mvalue=value if reply_value is None else reply_value,
                headers=orjson.dumps(dict(reply_headers or {})).decode(),
            )
        )
        if sql.complete_pg is not None:
            row = await session.first(sql.complete_pg, values)
            return None if row is None else int(row[0])
        if await session.first(sql.done_returning, values) is None:
            return None
        row = await session.first(sql.insert_outbox, values)
        assert row is not None
        return int(row[0])

    # -- saga steps ---------------------------------------------------------------------------------------

    async def begin_forward(self, tx: StoreTransaction, service: str, execution_id: str, step: str) -> str:
        """In ``tx``: record that step's forward command is taking effect, locking its row.

        Returns the step's state: ``forward`` (go on) or ``tombstone``/``compensated`` (refuse: the
        compensation came first). A compensation of the step waits for this transaction to end.
        """
        sql = self._statements()
        values = params({"service": service, "execution_id": execution_id, "step": step})
        row = await tx.session.first(sql.step_forward, values)
        assert row is not None
        return str(row[0])

    async def begin_compensation(
        self, tx: StoreTransaction, service: str, execution_id: str, step: str
    ) -> Literal["tombstoned", "forward", "tombstone", "compensated"]:
        """In ``tx``: leave a tombstone if the step's forward command never took effect.

        Returns ``tombstoned`` (a tombstone was written now: nothing to undo), else the state found,
        locked: ``forward`` (the forward command took effect, or an earlier attempt of this compensation
        did not finish: run the compensation), ``tombstone`` or ``compensated`` (nothing to undo).
        On PostgreSQL this waits for a forward command's transaction in progress on the same step.
        """
        sql = self._statements()
        values = params({"service": service, "execution_id": execution_id, "step": step})
        if await tx.session.first(sql.step_tombstone, values) is not None:
            return "tombstoned"
        row = await tx.session.first(sql.step_read, values)
        assert row is not None
        if row[0] in ("forward", "compensating"):
            return "forward"
        return "compensated" if row[0] == "compensated" else "tombstone"

    async def set_step(
        self, tx: StoreTransaction, service: str, execution_id: str, step: str, state: StepState
    ) -> None:
        """In ``tx``: set the step's state (``compensated`` after its compensation ran)."""
        sql = self._statements()
        values = params({"service": service, "execution_id": execution_id, "step": step, "state": state})
        await tx.session.run(sql.step_set, values)

    async def forward_running(self, service: str, execution_id: str, step: str) -> bool:
        """Whether a forward command of the step is claimed under a live lease (at-least-once handlers)."""
        sql = self._statements()
        values = params({"service": service, "execution_id": execution_id, "step": step})

        async def run(session: Session) -> bool:
            return await session.first(sql.forward_running, values) is not None

        running: bool = await self._run(run)
        return running

    # -- outbox ---------------------------------------------------------------------------------------------

    async def relay(
        self,
        service: str,
        publish: Callable[[Sequence[OutboxRow]], Awaitable[None]],
        *,
        older_than: float,
        limit: int = 100,
    ) -> int:
        """Publish (through ``publish``) and delete up to ``limit`` replies queued ``older_than`` seconds ago.

        The rows are locked while they are published (PostgreSQL: ``SKIP LOCKED``, so relays of several
        instances share them); a failing ``publish`` leaves them queued. Returns how many were sent.
        """
        sql = self._statements()
        async with self.transaction() as tx:
            found = await tx.session.all(sql.unsent, params(service=service, age=older_than, limit=limit))
            rows = [OutboxRow(int(r[0]), r[1], r[2], bytes(r[3]), dict(orjson.loads(r[4]))) for r in found]
            if not rows:
                return 0
            await publish(rows)
            await tx.session.run(sql.delete_outbox, params(ids=[row.id for row in rows]))
            return len(rows)

    async def forget_outbox(self, ids: Sequence[int]) -> None:
        """Delete outbox rows already published by the instance that committed them."""
        if not ids:
            return
        sql = self._statements()

        async def run(session: Session) -> None:
            await session.run(sql.delete_outbox, params(ids=list(ids)))

        await self._run(run)
