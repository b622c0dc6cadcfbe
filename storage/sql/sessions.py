"""How a prepared Core statement reaches the database: through SQLAlchemy, or straight to the driver.

`SqlAlchemySession` executes statements with ``AsyncConnection.execute``: SQLAlchemy's compiled cache, type
processors and result objects. It serves statements built per call (`SagaStorage.query`), those whose SQL
depends on the values (expanding ``IN``), and any driver without a session of its own.

The driver sessions are the hot path. Each prebuilt Core statement is compiled once per storage by the
engine's own SQLAlchemy dialect into its SQL text, positional parameter order, constants and bind processors
(a `Plan`), and then runs on the connection's driver directly, skipping the per-call greenlet hop, execution
context and result wrapping, which cost more than the statement itself. Measured client CPU per ``save``
``UPDATE``: asyncpg ~95 µs against ~220 µs through ``AsyncConnection.execute`` (and ~85 µs for the same
statement written by hand); aiosqlite ~195 µs against ~480 µs (one hop to the SQLite thread instead of
four). Nothing is lost: the SQL and the bind processing are SQLAlchemy's own, and so is the result
processing on SQLite; asyncpg needs none, because the column codecs SQLAlchemy registered when it opened
the connection already return aware datetimes, bytes and decoded JSON.

All sessions run on the same long-lived autocommit connections (`storage.sql.connections.ConnectionHolder`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.selectable import ReturnsRows
from sqlalchemy.types import ARRAY, TypeEngine

__all__ = ["AiosqliteSession", "AsyncpgSession", "Plan", "Plans", "Session", "SqlAlchemySession"]

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
    """A Core statement compiled for one driver: SQL text, and how to bind and read its values.

    Attributes:
        sql: The statement text in the driver's parameter style.
        binds: Per position: the caller's parameter name (``None`` for a constant), the constant, and the
            bind processor SQLAlchemy would apply (``None`` when the value goes to the driver as is).
        results: Per returned column, SQLAlchemy's result processor; ``None`` when the driver's own
            decoding already gives the final values (asyncpg) or nothing needs converting.
    """

    sql: str
    binds: tuple[tuple[str | None, Any, Callable[[Any], Any] | None], ...]
    results: tuple[Callable[[Any], Any] | None, ...] | None = None

    def args(self, params: Params | None) -> list[Any]:
        """Positional arguments for the driver from named parameters."""
        out = []
        for name, constant, process in self.binds:
            value = constant if name is None else params[name]  # type: ignore[index]
            out.append(value if process is None or value is None else process(value))
        return out

    def rows(self, rows: Sequence[Row]) -> Sequence[Row]:
        """Rows as SQLAlchemy would return them (column types' result processing applied)."""
        results = self.results
        if results is None:
            return rows
        return [
            tuple(v if f is None or v is None else f(v) for f, v in zip(results, row, strict=True))
            for row in rows
        ]


class Plans:
    """Compiled plans of the prebuilt statements, shared by every session of one storage.

    Args:
        dialect: The engine's dialect, which renders the SQL and supplies the type processors.
        process_results: Apply SQLAlchemy's result processors to returned rows (needed where the driver
            returns raw text, as SQLite does for timestamps, UUIDs and JSON).
    """

    def __init__(self, dialect: Dialect, *, process_results: bool = False) -> None:
        self._dialect = dialect
        self._process_results = process_results
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
            process = _bind_processor(bind.type, dialect)
            if name.startswith("p_"):
                binds.append((name, None, process))
            else:  # a literal in the statement, e.g. the 1 of ``version + 1``
                value = bind.effective_value
                binds.append((None, value if process is None or value is None else process(value), None))
        results = None
        if self._process_results and isinstance(stmt, ReturnsRows):
            processors = tuple(
                c.type.dialect_impl(dialect).result_processor(dialect, None) for c in stmt.exported_columns
            )
            if any(p is not None for p in processors):
                results = processors
        return Plan(sql=compiled.string, binds=tuple(binds), results=results)


def _bind_processor(type_: TypeEngine[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    """SQLAlchemy's bind processor for ``type_``, or ``None`` where it would only copy the value.

    A one-dimensional ``ARRAY`` gets SQLAlchemy's generic processor, which inspects the value's nesting on
    every call; here its items are processed in one comprehension, and an array whose items need no
    processing goes to the driver as the caller gave it.
    """
    impl = type_.dialect_impl(dialect)
    if isinstance(impl, ARRAY) and impl.dimensions in (None, 1):
        item = impl.item_type.dialect_impl(dialect).bind_processor(dialect)
        if item is None:
            return None
        if impl.dimensions == 1:  # flat for sure (without dimensions, SQLAlchemy looks for nesting)
            return lambda values: [None if v is None else item(v) for v in values]
    return impl.bind_processor(dialect)


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


class AiosqliteSession(Session):
    """Prebuilt statements straight on aiosqlite: one hop to its thread per statement.

    Through SQLAlchemy's adapter a statement costs four hops (cursor, execute, fetch, close); here
    ``execute_fetchall`` does it in one. Rows are then processed with SQLAlchemy's own result processors.
    """

    __slots__ = ("plans", "raw")

    def __init__(self, conn: AsyncConnection, begin_sql: str, raw: Any, plans: Plans) -> None:
        super().__init__(conn, begin_sql)
        self.raw = raw
        self.plans = plans

    async def all(self, stmt: Executable, params: Params | None = None) -> Sequence[Row]:
        plan = self.plans.get(stmt)
        if plan is None:
            return await super().all(stmt, params)
        return plan.rows(await self.raw.execute_fetchall(plan.sql, plan.args(params)))

    async def first(self, stmt: Executable, params: Params | None = None) -> Row | None:
        rows = await self.all(stmt, params)
        return rows[0] if rows else None

    async def run(self, stmt: Executable, params: Params | None = None) -> None:
        plan = self.plans.get(stmt)
        if plan is None:
            await super().run(stmt, params)
        else:
            await self.raw.execute_fetchall(plan.sql, plan.args(params))

    async def run_many(self, stmt: Executable, params: list[Params]) -> None:
        plan = self.plans.get(stmt)
        if plan is None:
            await super().run_many(stmt, params)
        else:
            cursor = await self.raw.executemany(plan.sql, [plan.args(p) for p in params])
            await cursor.close()

    async def begin(self) -> None:
        await self.raw.execute_fetchall(self.begin_sql, ())

    async def commit(self) -> None:
        await self.raw.execute_fetchall("COMMIT", ())

    async def rollback(self) -> None:
        await self.raw.execute_fetchall("ROLLBACK", ())
