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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from types import TracebackType

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.errors import StorageError, StorageUnavailableError

__all__ = ["ConnectionHolder", "ErrorTranslator"]


def _is_unavailable(error: BaseException) -> bool:
    if isinstance(error, sa_exc.DBAPIError):
        return error.connection_invalidated or isinstance(
            error, sa_exc.InterfaceError | sa_exc.OperationalError
        )
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
        if _is_unavailable(exc):
            raise StorageUnavailableError(
                f"database {self._url} unavailable during {self._operation}: {_describe(exc)}"
            ) from exc
        if isinstance(exc, sa_exc.SQLAlchemyError):
            raise StorageError(f"{self._operation} failed on {self._url}: {_describe(exc)}") from exc


def _reusable(error: BaseException) -> bool:
    # A constraint or data error leaves an autocommit connection perfectly usable.
    return isinstance(
        error, StorageError | sa_exc.IntegrityError | sa_exc.DataError | sa_exc.ProgrammingError
    )


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
        self._idle: list[AsyncConnection] = []
        self._begin_sql = begin_sql

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection in autocommit mode, exclusively the caller's until the block ends."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._engine.connect()
            try:
                yield conn
            except BaseException as error:
                if _reusable(error) and not conn.invalidated:
                    self._idle.append(conn)
                else:
                    await self._discard(conn)
                raise
            else:
                self._idle.append(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A connection inside an explicit transaction, committed when the block ends without error."""
        async with self.connect() as conn:
            await conn.exec_driver_sql(self._begin_sql)
            try:
                yield conn
            except BaseException:
                # Best effort: if the connection died, `connect` discards it and the server rolls back.
                with suppress(Exception):
                    await conn.exec_driver_sql("ROLLBACK")
                raise
            await conn.exec_driver_sql("COMMIT")

    async def _discard(self, conn: AsyncConnection) -> None:
        with suppress(Exception):
            await conn.invalidate()
        with suppress(Exception):
            await conn.close()

    async def close(self) -> None:
        """Return every idle connection to the engine's pool."""
        idle, self._idle = self._idle, []
        for conn in idle:
            with suppress(Exception):
                await conn.close()
