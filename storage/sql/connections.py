"""Connections kept open in autocommit mode, and the translation of driver errors into storage errors.

Why not check a connection out of SQLAlchemy's pool per call: on this path the pool's checkout, reset and
event bookkeeping cost more CPU than the statement itself (measured: ~125 µs per checkout against ~50 µs for
a single-row autocommit UPDATE). So the storage keeps up to ``size`` connections checked out for its whole
life, hands them to one task at a time, and runs them in ``AUTOCOMMIT``: a single-statement write is exactly
one round trip, with no ``BEGIN``/``COMMIT`` around it. Multi-statement writes open an explicit transaction
on the same connection (``BEGIN`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite so the write lock is taken
up front instead of failing half-way with ``database is locked``).

A connection that failed in a way that may have left it unusable (dropped, cancelled mid-statement,
invalidated by SQLAlchemy) is closed and replaced on the next call; one that merely hit a constraint is
reused.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from types import TracebackType

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.errors import StorageError, StorageUnavailableError
from storage.sql.sessions import AiosqliteSession, AsyncpgSession, Plans, Session, SqlAlchemySession

try:  # the driver of the PostgreSQL fast path, whose errors arrive unwrapped by SQLAlchemy
    import asyncpg  # type: ignore[import-untyped]

    _PG_ERROR: tuple[type[BaseException], ...] = (asyncpg.PostgresError,)
    _PG_INTEGRITY: tuple[type[BaseException], ...] = (asyncpg.IntegrityConstraintViolationError,)
    _PG_CLIENT: tuple[type[BaseException], ...] = (asyncpg.InterfaceError, asyncpg.InternalClientError)
except ImportError:  # pragma: no cover - asyncpg is a dependency, but SQLite alone does not need it
    _PG_ERROR = _PG_INTEGRITY = _PG_CLIENT = ()

__all__ = ["INTEGRITY_ERRORS", "ConnectionHolder", "ErrorTranslator"]

#: Errors the driver sessions raise unwrapped (SQLAlchemy would have wrapped them in ``DBAPIError``).
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, *_PG_ERROR)

#: A unique/primary-key violation, from SQLAlchemy or from a driver session.
INTEGRITY_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.IntegrityError,
    sqlite3.IntegrityError,
    *_PG_INTEGRITY,
)

# SQLSTATE classes meaning "the server or the connection", not "this statement": connection exception,
# operator intervention (shutdown, cancel), insufficient resources (too many connections, disk full).
_UNAVAILABLE_SQLSTATE = ("08", "57", "53")
_SQLITE_UNAVAILABLE = ("locked", "busy", "unable to open", "disk i/o")


def _is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` means "the database or the connection is gone" (retriable) rather than "this
    statement is wrong"."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    orig = error.orig if isinstance(error, sa_exc.DBAPIError) and error.orig is not None else error
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate[:2] in _UNAVAILABLE_SQLSTATE
    if isinstance(orig, sqlite3.OperationalError):
        # SQLite reports a busy database and a broken schema with the same class: only the former retries.
        return any(m in str(orig).lower() for m in _SQLITE_UNAVAILABLE)
    if isinstance(error, sa_exc.InterfaceError | sa_exc.OperationalError) or isinstance(orig, _PG_CLIENT):
        return True
    # OSError covers refused/reset connections; TimeoutError covers pool and connect timeouts.
    return isinstance(error, OSError | TimeoutError | sa_exc.TimeoutError | sa_exc.DisconnectionError)


def _describe(error: BaseException) -> str:
    # The driver's own error, first line only: SQLAlchemy's text would append the SQL and its parameters.
    orig = getattr(error, "orig", None) or error
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {first}" if first else type(orig).__name__


class ErrorTranslator:
    """Context manager that turns driver and SQLAlchemy errors into `StorageError`s.

    `StorageError`s raised inside pass through untouched. The URL in messages is rendered without its
    password. One instance per call: it carries the operation's name for the message.
    """

    __slots__ = ("_operation", "_url")

    def __init__(self, url: str, operation: str) -> None:
        self._url = url
        self._operation = operation

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or isinstance(exc, StorageError) or not isinstance(exc, Exception):
            return
        if (
            isinstance(exc, sa_exc.StatementError)
            and not isinstance(exc, sa_exc.DBAPIError)
            and isinstance(exc.orig, TypeError | ValueError)
        ):
            # A value that cannot be bound (not JSON-able, wrong type) is the caller's bug, not the
            # database's: surface it as is, as the asyncpg path (which binds outside SQLAlchemy) does.
            raise exc.orig from exc
        if _is_unavailable(exc):
            raise StorageUnavailableError(
                f"database {self._url} unavailable during {self._operation}: {_describe(exc)}"
            ) from exc
        if isinstance(exc, (sa_exc.SQLAlchemyError, *_DRIVER_ERRORS)):
            raise StorageError(
                f"{self._operation} failed on {self._url}: {_describe(exc)}{_missing_tables_hint(exc)}"
            ) from exc


#: How SQLite and PostgreSQL say a table is missing; the saga tables all start with ``saga_``.
_MISSING_TABLE = ("no such table: saga_", 'relation "saga_')


def _missing_tables_hint(exc: BaseException) -> str:
    """The fix when the saga tables are missing: a fresh database that was never migrated."""
    text = str(exc)
    if any(marker in text for marker in _MISSING_TABLE) and (
        "no such table" in text or "does not exist" in text
    ):
        return (
            "; the database has no kafka-saga tables yet: run `kafka-saga db upgrade` "
            "(or turn storage.auto_migrate on)"
        )
    return ""


def _reusable(error: BaseException) -> bool:
    # A constraint or data error leaves an autocommit connection perfectly usable.
    if isinstance(error, StorageError | TypeError | ValueError):
        return True  # raised before anything reached the server
    if isinstance(error, sa_exc.StatementError) and not isinstance(error, sa_exc.DBAPIError):
        return True
    if isinstance(error, (sa_exc.DBAPIError, *_DRIVER_ERRORS)):
        return not _is_unavailable(error)
    return False


class _Connected:
    """`ConnectionHolder.connect`'s context manager.

    A class rather than ``@asynccontextmanager``: it runs around every statement, and the generator-based
    form costs a generator, its frame and a wrapper per use (they showed in profiles under load).
    """

    __slots__ = ("_holder", "_session")

    def __init__(self, holder: ConnectionHolder) -> None:
        self._holder = holder
        self._session: Session | None = None

    async def __aenter__(self) -> Session:
        holder = self._holder
        await holder._slots.acquire()
        holder._busy += 1
        try:
            holder._closed = False
            session = self._session = holder._idle.pop() if holder._idle else await holder._open()
        except BaseException:
            holder._busy -= 1
            holder._slots.release()
            raise
        return session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        holder, session = self._holder, self._session
        assert session is not None
        self._session = None
        try:
            if error is None or (_reusable(error) and not session.conn.invalidated):
                await holder._put_back(session)
            else:
                await holder._discard(session)
        finally:
            holder._busy -= 1
            holder._slots.release()


class ConnectionHolder:
    """Up to ``size`` long-lived autocommit connections, each used by one task at a time.

    Args:
        engine: The storage's engine; connections come from its pool and go back to it on `close`.
        size: How many statements may run at once (the rest wait their turn).
        begin_sql: The statement that opens an explicit transaction on this backend.
    """

    def __init__(self, engine: AsyncEngine, size: int, *, begin_sql: str) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._slots = asyncio.Semaphore(size)
        self._size = size
        self._busy = 0
        self._idle: list[Session] = []
        self._begin_sql = begin_sql
        self._driver = engine.dialect.driver
        self._plans = Plans(engine.dialect, process_results=self._driver == "aiosqlite")
        self._closed = False

    async def _open(self) -> Session:
        conn = await self._engine.connect()
        if self._driver == "asyncpg":
            raw = (await conn.get_raw_connection()).driver_connection
            return AsyncpgSession(conn, self._begin_sql, raw, self._plans)
        if self._driver == "aiosqlite":
            raw = (await conn.get_raw_connection()).driver_connection
            return AiosqliteSession(conn, self._begin_sql, raw, self._plans)
        return SqlAlchemySession(conn, self._begin_sql)

    def busy(self) -> bool:
        """Whether the database is busy for this storage: two statements running (or every connection)."""
        return self._busy >= min(2, self._size)

    def connect(self) -> _Connected:
        """A session in autocommit mode, exclusively the caller's until the ``async with`` block ends."""
        return _Connected(self)

    async def _put_back(self, session: Session) -> None:
        if self._closed:  # `close` ran while this call was in flight: do not keep the connection
            with suppress(Exception):
                await session.conn.close()
        else:
            self._idle.append(session)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Session]:
        """A session inside an explicit transaction, committed when the block ends without error."""
        async with self.connect() as session:
            await session.begin()
            try:
                yield session
            except BaseException:
                # Best effort: if the connection died, `connect` discards it and the server rolls back.
                with suppress(Exception):
                    await session.rollback()
                raise
            await session.commit()

    async def _discard(self, session: Session) -> None:
        with suppress(Exception):
            await session.conn.invalidate()
        with suppress(Exception):
            await session.conn.close()

    async def close(self) -> None:
        """Return every idle connection to the engine's pool (busy ones follow when their call ends)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for session in idle:
            with suppress(Exception):
                await session.conn.close()
