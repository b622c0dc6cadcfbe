"""What the chaos apps share: the Kafka pool, writes that survive a database restart, step-run records and
crash points.

Step runs. Every local step and local compensation of the chaos saga records ``(order, step, pid, started,
finished)`` in ``chaos_step_runs``; the test then checks that no two processes ran the same step of the same
saga at overlapping times. A run cut short by a kill has no ``finished``; the test closes it at the moment
it saw the process dead.

Durable writes. The participants' effect rows and the step-run rows must not fail a saga just because
PostgreSQL restarts under them, and an effect must not be written twice because a commit's answer was lost
with the connection. Each write retries until the database answers again; an effect row carries a token
unique to the handler invocation, so a retry first checks whether its previous attempt committed. A
duplicate *invocation* (what the suites hunt for) has its own token and still shows up as a second row.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from broker import KafkaBrokerPool
from tests.e2e import db

_log = logging.getLogger("chaos")
T = TypeVar("T")

#: Env var naming the crash point of an orchestrator process, ``point:n`` (die at the n-th time there).
CRASH_ENV = "CHAOS_CRASH"
#: The crash points an orchestrator knows (see `CrashPoint`).
CRASH_POINTS = (
    "outbox_committed",  # a save carrying commands committed, not yet published (state commit -> publish)
    "reply_committed",  # a reply's dedup row and new state committed, the Kafka offset not yet committed
    "reply_applying",  # inside apply_reply: handler ran, nothing saved yet
    "compensation_started",  # a compensation begins
    "compensation_completed",  # a compensation finished, its state not saved yet
    "local_step",  # in the middle of a local step (after its run was recorded as started)
)
#: Longest a durable write keeps retrying (a database restart takes a few seconds).
DURABLE_FOR = 120.0

STEP_RUNS_DDL = """CREATE TABLE IF NOT EXISTS chaos_step_runs (
    id bigserial PRIMARY KEY,
    order_no integer NOT NULL,
    step text NOT NULL,
    pid integer NOT NULL,
    started double precision NOT NULL,
    finished double precision,
    token uuid NOT NULL
)"""


def kafka_pool(bootstrap: str, client_id: str) -> KafkaBrokerPool:
    """A pool that waits for a restarting broker and leaves dead members' partitions quickly."""
    return KafkaBrokerPool(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        topic_partitions=4,
        connect_timeout=90.0,
        session_timeout_ms=6_000,  # the broker's group.min.session.timeout.ms
        heartbeat_interval_ms=500,
        request_timeout_ms=15_000,
    )


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def setup_logging(name: str, level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s {name}[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.ERROR)


# -- crash points ---------------------------------------------------------------------------------------


class CrashPoint:
    """Kills this process with SIGKILL the n-th time it passes ``point`` (from ``CHAOS_CRASH=point:n``).

    It prints ``CRASH <point> <n>`` first, so the test can tell a crash point from its own kills.
    """

    def __init__(self, spec: str | None) -> None:
        self.point: str | None = None
        self.left = 0
        self.n = 0
        if spec:
            point, _, count = spec.partition(":")
            if point not in CRASH_POINTS:
                raise SystemExit(f"unknown crash point {point!r} (known: {', '.join(CRASH_POINTS)})")
            self.point, self.n = point, int(count or "1")
            self.left = self.n

    @classmethod
    def from_env(cls) -> CrashPoint:
        return cls(os.environ.get(CRASH_ENV))

    def hit(self, point: str) -> None:
        if point != self.point:
            return
        self.left -= 1
        if self.left <= 0:
            say(f"CRASH {point} {self.n}")
            os.kill(os.getpid(), signal.SIGKILL)


# -- durable writes ---------------------------------------------------------------------------------------


def _permanent(exc: BaseException) -> bool:
    """A mistake in the statement, not the database being away: retrying cannot help."""
    return isinstance(exc, sa_exc.IntegrityError | sa_exc.ProgrammingError | sa_exc.ArgumentError)


async def durably(
    operation: Callable[[], Awaitable[T]],
    *,
    committed: Callable[[], Awaitable[bool]] | None = None,
    what: str = "write",
) -> T | None:
    """Run ``operation`` until it succeeds or `DURABLE_FOR` passes.

    After a failure, ``committed()`` (when given) tells whether the failed attempt committed after all;
    then the result is ``None`` and the write is not repeated.
    """
    deadline = time.monotonic() + DURABLE_FOR
    delay = 0.05
    failed = False
    while True:
        try:
            if failed and committed is not None and await committed():
                return None
            return await operation()
        except Exception as exc:
            if _permanent(exc) or time.monotonic() > deadline:
                raise
            if not failed:
                _log.warning(
                    "%s failed (%s: %s); retrying until the database answers", what, type(exc).__name__, exc
                )
            failed = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def engine(url: str, size: int = 5) -> AsyncEngine:
    return create_async_engine(url, pool_size=size, max_overflow=size, pool_pre_ping=True)


async def create_tables(eng: AsyncEngine) -> None:
    """The e2e participants' tables, a token column on them, and the step-run table."""
    await db.create_tables(eng)
    async with eng.begin() as conn:
        for service in db.SERVICES:
            for table in (f"{service}_effects", f"{service}_decisions"):
                await conn.execute(text(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS token uuid"))
        await conn.execute(text(STEP_RUNS_DDL))


async def _exists(eng: AsyncEngine, table: str, token: uuid.UUID) -> bool:
    async def look() -> bool:
        async with eng.connect() as conn:
            row = await conn.execute(text(f"SELECT 1 FROM {table} WHERE token = :t"), {"t": token})
            return row.first() is not None

    return bool(await durably(look, what=f"lookup in {table}"))


async def record_effect(
    eng: AsyncEngine, service: str, *, idempotency_key: str, execution_id: uuid.UUID, order: int, effect: str
) -> None:
    """One effect row per handler invocation, even across a database restart."""
    token = uuid.uuid4()
    table = f"{service}_effects"

    async def insert() -> None:
        async with eng.begin() as conn:
            await conn.execute(
                text(
                    f"INSERT INTO {table} (idempotency_key, execution_id, order_no, effect, token) "
                    "VALUES (:key, :execution_id, :order_no, :effect, :token)"
                ),
                {
                    "key": idempotency_key,
                    "execution_id": execution_id,
                    "order_no": order,
                    "effect": effect,
                    "token": token,
                },
            )

    await durably(insert, committed=lambda: _exists(eng, table, token), what=f"{effect} effect")


async def record_decision(eng: AsyncEngine, service: str, *, execution_id: uuid.UUID, action: str) -> None:
    token = uuid.uuid4()
    table = f"{service}_decisions"

    async def insert() -> None:
        async with eng.begin() as conn:
            await conn.execute(
                text(
                    f"INSERT INTO {table} (execution_id, action, token) VALUES (:execution_id, :action, :t)"
                ),
                {"execution_id": execution_id, "action": action, "t": token},
            )

    await durably(insert, committed=lambda: _exists(eng, table, token), what=f"{action} decision")


class StepRuns:
    """Records when this process runs a local step (see the module docstring)."""

    def __init__(self, eng: AsyncEngine) -> None:
        self.engine = eng
        self.pid = os.getpid()

    async def run(self, order: int, step: str, work: Callable[[], Awaitable[Any]]) -> Any:
        token = uuid.uuid4()

        async def start() -> None:
            async with self.engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO chaos_step_runs (order_no, step, pid, started, token) "
                        "VALUES (:o, :s, :p, :t, :token)"
                    ),
                    # The start time of the attempt that commits: a retry while the database was away
                    # does not stretch the run back to when the step first tried to record it.
                    {"o": order, "s": step, "p": self.pid, "t": time.time(), "token": token},
                )

        await durably(
            start, committed=lambda: _exists(self.engine, "chaos_step_runs", token), what="step start"
        )
        try:
            return await work()
        finally:
            finished = time.time()

            async def finish() -> None:
                async with self.engine.begin() as conn:
                    await conn.execute(
                        text("UPDATE chaos_step_runs SET finished = :f WHERE token = :token"),
                        {"f": finished, "token": token},
                    )

            await durably(finish, what="step finish")
