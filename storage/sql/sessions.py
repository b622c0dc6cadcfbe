"""How a prepared Core statement reaches the database: through SQLAlchemy, or straight to asyncpg.

`SqlAlchemySession` executes statements with ``AsyncConnection.execute``: SQLAlchemy's compiled cache, type
processors and result objects. That is the path on SQLite (whose driver hop to its thread costs more than
SQLAlchemy does) and for statements built per call (`SagaStorage.query`).

`AsyncpgSession` is the PostgreSQL hot path. Each prebuilt Core statement is compiled once per storage by
SQLAlchemy's asyncpg dialect into its SQL text, positional parameter order, constants and bind processors
(a `Plan`), and then runs on the connection's asyncpg driver directly. Measured on the optimistic ``UPDATE``
of `save`: ~95 µs of client CPU against ~220 µs through ``AsyncConnection.execute``, whose greenlet hop,
execution context and result wrapping cost more than the statement itself, and against ~85 µs for the
same statement written by hand. Nothing is lost: the SQL and the bind processing are SQLAlchemy's own; the
result values need no processing because the columns' asyncpg codecs (registered by SQLAlchemy when it
opened the connection) already return aware datetimes, bytes and decoded JSON.

Both run on the same long-lived autocommit connections (`storage.sql.connections.ConnectionHolder`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ["AsyncpgSession", "Plan", "Plans", "Session", "SqlAlchemySession"]

Row = Sequence[Any]
Params = dict[str, Any]


class Session:
    """One connection, used by one task at a time. Subclasses pick the execution path."""

    __slots__ = ("begin_sql", "conn")

    def __init__(self, conn: AsyncConnection, begin_sql: str) -> None:
        self.conn = conn
        self.begin_sql = begin_sql

    async def all(self, stmt: Executable, params: Params | None = None) -> Sequence[Row]:
        """Every row the statement returns."""
        return (await self.conn.execute(stmt, params)).all()

    async def first(self, stmt: Executable, params: Params | None = None) -> Row | None:
        """The first row, or ``None``."""
        return (await self.conn.execute(stmt, params)).first()

    async def run(self, stmt: Executable, params: Params | None = None) -> None:
        """Execute for effect."""
        await self.conn.execute(stmt, params)

    async def run_many(self, stmt: Executable, params: list[Params]) -> None:
        """Execute once per parameter set (driver ``executemany``)."""
        await self.conn.execute(stmt, params)

    async def sa_all(self, stmt: Executable, params: Params | None = None) -> Sequence[Row]:
        """Every row, always through SQLAlchemy (for statements built per call)."""
        return (await self.conn.execute(stmt, params)).all()

    async def begin(self) -> None:
        """Open an explicit transaction (the connection is otherwise in autocommit)."""
        await self.conn.exec_driver_sql(self.begin_sql)

    async def commit(self) -> None:
        """Commit the explicit transaction."""
        await self.conn.exec_driver_sql("COMMIT")

    async def rollback(self) -> None:
        """Roll the explicit transaction back."""
        await self.conn.exec_driver_sql("ROLLBACK")


class SqlAlchemySession(Session):
    """Every statement through ``AsyncConnection.execute`` (the portable path)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Plan:
    """A Core statement compiled for asyncpg: SQL text and how to build its positional arguments.

    Attributes:
        sql: The statement text with ``$n`` placeholders.
        binds: Per position: the caller's parameter name (``None`` for a constant), the constant, and the
            bind processor SQLAlchemy would apply (``None`` when the value goes to asyncpg as is).
    """

    sql: str
    binds: tuple[tuple[str | None, Any, Callable[[Any], Any] | None], ...]

    def args(self, params: Params | None) -> list[Any]:
        """Positional arguments for asyncpg from named parameters."""
        out = []
        for name, constant, process in self.binds:
            value = constant if name is None else params[name]  # type: ignore[index]
            out.append(value if process is None or value is None else process(value))
        return out


class Plans:
    """Compiled plans of the prebuilt statements, shared by every session of one storage."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._plans: dict[int, tuple[object, Plan | None]] = {}

    def get(self, stmt: Executable) -> Plan | None:
        """The plan of ``stmt``, compiling it on first use; ``None`` if it needs SQLAlchemy at run time."""
        found = self._plans.get(id(stmt))
        if found is not None and found[0] is stmt:
            return found[1]
        assert isinstance(stmt, ClauseElement)
        plan = self._compile(stmt)
        # Keep the statement alive with its plan, so its id() cannot be reused by another object.
        self._plans[id(stmt)] = (stmt, plan)
        return plan

    def _compile(self, stmt: ClauseElement) -> Plan | None:
        dialect = self._dialect
        compiled = stmt.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        binds: list[tuple[str | None, Any, Callable[[Any], Any] | None]] = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            if bind.expanding or bind.literal_execute:
                return None  # rendered per call from the values: leave it to SQLAlchemy
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if name.startswith("p_"):
                binds.append((name, None, process))
            else:  # a literal in the statement, e.g. the 1 of ``version + 1``
                value = bind.effective_value
                binds.append((None, value if process is None or value is None else process(value), None))
        return Plan(sql=compiled.string, binds=tuple(binds))


class AsyncpgSession(Session):
    """Prebuilt statements straight on the asyncpg driver, from plans compiled by SQLAlchemy."""

    __slots__ = ("plans", "raw")

    def __init__(self, conn: AsyncConnection, begin_sql: str, raw: Any, plans: Plans) -> None:
        super().__init__(conn, begin_sql)
        self.raw = raw
        self.plans = plans

    async def all(self, stmt: Executable, params: Params | None = None) -> Sequence[Row]:
        plan = self.plans.get(stmt)
        if plan is None:
            return await super().all(stmt, params)
        rows: Sequence[Row] = await self.raw.fetch(plan.sql, *plan.args(params))
        return rows

    async def first(self, stmt: Executable, params: Params | None = None) -> Row | None:
        plan = self.plans.get(stmt)
        if plan is None:
            return await super().first(stmt, params)
        row: Row | None = await self.raw.fetchrow(plan.sql, *plan.args(params))
        return row

    async def run(self, stmt: Executable, params: Params | None = None) -> None:
        plan = self.plans.get(stmt)
        if plan is None:
            await super().run(stmt, params)
        else:
            await self.raw.execute(plan.sql, *plan.args(params))

    async def run_many(self, stmt: Executable, params: list[Params]) -> None:
        plan = self.plans.get(stmt)
        if plan is None:
            await super().run_many(stmt, params)
        else:
            await self.raw.executemany(plan.sql, [plan.args(p) for p in params])

    async def begin(self) -> None:
        await self.raw.execute(self.begin_sql)

    async def commit(self) -> None:
        await self.raw.execute("COMMIT")

    async def rollback(self) -> None:
        await self.raw.execute("ROLLBACK")
