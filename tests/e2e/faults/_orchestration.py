"""What the fault tests of the fencing and outbox scenarios share: processes, sagas and the records counted.

Every process is this module run as ``python -m tests.e2e.faults._orchestration ROLE CONFIG`` (CONFIG a
JSON object), so the faults between processes (a process that exits with a claimed unsent row, a frozen
recovery worker, a skewed clock) are real:

* ``participant`` (`tests.e2e.faults._participant`): consumes the run's command topics and its control
  topic with a plain Kafka consumer (no dedup, no tombstones: every delivery counts) and records each
  command and decision in ``fault_commands``, then replies 200, or 500 for the first ``fail_first[topic]``
  commands of an execution on that topic;
* ``orchestrator``: a `SagaManager` (PostgreSQL and Kafka) with this module's sagas registered, optionally
  a `SagaRecoveryWorker`, a crash point and a skewed wall clock; it starts the runs it is given and prints
  one ``RUN {json}`` line per run.

The tables have no unique constraint, so a command published twice, or a local step run twice, shows as
two rows. Times in them are the database's (``clock_timestamp()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from broker import KafkaBrokerPool
from broker.settings import KafkaSettings
from saga import RetryPolicy, Saga, SagaContext, SagaManager, SagaRecoveryWorker, SagaRequest
from storage import SagaStatus, SqlAlchemySagaStorage
from storage.migrate import upgrade_async

REPO_ROOT = Path(__file__).resolve().parents[3]


def service(suffix: str) -> str:
    """The participant's service name (decisions go to its control topic)."""
    return f"faultp{suffix}"


_log = logging.getLogger("fault")

SCHEMA = [
    """CREATE TABLE fault_commands (
        id BIGSERIAL PRIMARY KEY, topic TEXT NOT NULL, kind TEXT NOT NULL, execution_id UUID,
        request_id UUID, idempotency_key TEXT, step TEXT, replied INTEGER, pid INTEGER,
        received_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())""",
    """CREATE TABLE fault_local_runs (
        id BIGSERIAL PRIMARY KEY, execution_id UUID NOT NULL, step TEXT NOT NULL, pid INTEGER NOT NULL,
        started_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(), ended_at TIMESTAMPTZ)""",
]


def topics(suffix: str) -> dict[str, str]:
    """The run's command topics by step."""
    return {step: f"fault_{step}_{suffix}" for step in ("ship", "reserve", "release", "charge", "refund")}


# -- sagas ----------------------------------------------------------------------------------------------


def sagas(suffix: str, engine: AsyncEngine | None) -> list[Saga]:
    """The sagas the orchestrators register (``engine`` records local step runs)."""
    t = topics(suffix)

    def ship(context: SagaContext) -> SagaRequest:
        target = context["topic"] if "topic" in context else t["ship"]
        return SagaRequest(target, {"blob": "x" * int(context["size"])})

    def reserve(context: SagaContext) -> SagaRequest:
        return SagaRequest(t["reserve"], {"order": context["order"]})

    def release(context: SagaContext) -> SagaRequest:
        return SagaRequest(t["release"], {"order": context["order"]})

    def charge(context: SagaContext) -> SagaRequest:
        return SagaRequest(t["charge"], {"order": context["order"]})

    def refund(context: SagaContext) -> SagaRequest:
        return SagaRequest(t["refund"], {"order": context["order"]})

    async def slow(context: SagaContext) -> None:
        # Blocking on purpose: a stalled worker neither renews its lease nor notices it lost it.
        assert engine is not None
        async with engine.begin() as conn:
            run = (
                await conn.execute(
                    text(
                        "INSERT INTO fault_local_runs (execution_id, step, pid)"
                        " VALUES (:e, 'slow', :p) RETURNING id"
                    ),
                    {"e": context["execution"], "p": os.getpid()},
                )
            ).scalar_one()
        seconds = float(os.environ.get("FAULT_SLOW_STEP", "0"))
        if os.environ.get("FAULT_SLOW_ASYNC"):
            await asyncio.sleep(seconds)
            async with engine.begin() as conn:
                await conn.execute(
                    text("UPDATE fault_local_runs SET ended_at = clock_timestamp() WHERE id = :id"),
                    {"id": run},
                )
        else:
            # No await after the sleep: a worker that resumes goes straight to its save, as a stalled one
            # does.
            time.sleep(seconds)  # noqa: ASYNC251

    retry = RetryPolicy(
        max_attempts=3,
        initial_delay=float(os.environ.get("FAULT_RETRY_DELAY", "1")),
        backoff=2.0,
        max_delay=60.0,
    )
    return [
        Saga("poison").remote_step(ship, name="ship").commit(),
        # The reservation's reply is awaited 3 s; then it is compensated (no retry).
        Saga("reserve").remote_step(reserve, name="reserve", timeout=3).on_failure(release).commit(),
        Saga("slow").local_step(slow, name="slow").remote_step(charge, name="charge").commit(),
        Saga("flaky").remote_step(charge, name="charge", retry=retry).on_failure(refund).commit(),
        # The first step is local and records its runs: a claim taken twice at once shows as an overlap.
        Saga("timed")
        .local_step(slow, name="slow")
        .remote_step(reserve, name="reserve", timeout=60)
        .on_failure(release)
        .commit(),
    ]


# -- processes ------------------------------------------------------------------------------------------


@dataclass
class Proc:
    """One process of a fault test and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def lines(self, prefix: str) -> list[str]:
        return [
            line.removeprefix(prefix + " ")
            for line in self.stdout_path.read_text(errors="replace").splitlines()
            if line.startswith(prefix + " ") or line == prefix
        ]

    def runs(self) -> list[dict[str, Any]]:
        """The ``RUN`` lines the orchestrator printed."""
        return [json.loads(line) for line in self.lines("RUN")]

    def stderr_tail(self, count: int = 60) -> str:
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-count:])


@dataclass
class Procs:
    """Starts this module's roles as processes; every one is ended by pid at teardown."""

    directory: Path
    database_url: str
    bootstrap: str
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, role: str, env: Mapping[str, str] | None = None, **config: Any) -> Proc:
        config = {
            "database_url": self.database_url,
            "bootstrap": self.bootstrap,
            "suffix": self.suffix,
            "name": name,
            **config,
        }
        out, err = self.directory / f"{name}.stdout", self.directory / f"{name}.stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.e2e.faults._orchestration", role, json.dumps(config)],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        proc = Proc(name, process, out, err)
        self.procs.append(proc)
        return proc

    async def ready(self, *procs: Proc, within: float = 60.0) -> None:
        await self.wait_for(lambda: all(p.lines("READY") for p in procs), within, "READY")

    async def wait_for(self, condition: Callable[[], bool], within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {within} s\n{self.report()}")
            await asyncio.sleep(0.1)

    async def wait_for_async(
        self, condition: Callable[[], Awaitable[bool]], within: float, what: str
    ) -> None:
        deadline = time.monotonic() + within
        while not await condition():
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {within} s\n{self.report()}")
            await asyncio.sleep(0.1)

    def report(self) -> str:
        return "\n".join(
            f"----- {p.name} (pid {p.pid}, exit {p.process.poll()}) -----\n{p.stderr_tail()}"
            for p in self.procs
        )

    def stop(self, proc: Proc, grace: float = 15.0) -> None:
        if proc.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a frozen one must be able to handle SIGTERM
            proc.process.send_signal(signal.SIGTERM)
            try:
                proc.process.wait(grace)
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait(5)

    def stop_all(self) -> None:
        for proc in self.procs:
            self.stop(proc)


@contextlib.contextmanager
def processes(tmp_path: Path, database_url: str, bootstrap: str) -> Iterator[Procs]:
    procs = Procs(tmp_path, database_url, bootstrap)
    try:
        yield procs
    finally:
        procs.stop_all()


async def prepare(database_url: str) -> AsyncEngine:
    """Migrate the saga tables and create the counting tables; an engine on the database."""
    await upgrade_async(database_url)
    engine = create_async_engine(database_url, poolclass=NullPool)
    async with engine.begin() as conn:
        for statement in SCHEMA:
            await conn.execute(text(statement))
    return engine


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(text(sql), params)]


async def stalled(database_url: str, suffix: str, saga: str, context: Mapping[str, Any]) -> uuid.UUID:
    """Store an execution as a crashed process leaves it: RUNNING, unclaimed, nothing run yet."""
    from saga.execution import SagaExecution

    (definition,) = [s for s in sagas(suffix, None) if s.name == saga]
    execution = SagaExecution.start(
        definition, dict(context), reply_topic=f"faultorch{suffix}Reply", now=datetime.now(UTC)
    )
    async with SqlAlchemySagaStorage(database_url, auto_migrate=False) as storage:
        await storage.create(dataclasses.replace(execution.to_record(), status=SagaStatus.RUNNING))
    return execution.id


async def execution_rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    return await rows(
        engine,
        "SELECT id, name, status, error, recovery_attempts, steps FROM saga_executions ORDER BY created_at",
    )


@contextlib.asynccontextmanager
async def fault_run(
    tmp_path: Path, database_url: str, bootstrap: str
) -> AsyncIterator[tuple[Procs, AsyncEngine]]:
    """The processes and the counting engine of one fault test (its own database: ``e2e_database``)."""
    engine = await prepare(database_url)
    try:
        with processes(tmp_path, database_url, bootstrap) as procs:
            yield procs, engine
    finally:
        await engine.dispose()


# -- the orchestrator role ----------------------------------------------------------------------------


def skew_wall_clock(seconds: float) -> None:
    """Move this process's wall clock by ``seconds``: every reader of the local time the orchestrator's
    packages hold (their ``_utc_now`` partials, and `DatabaseClock`'s fallback) reads the skewed time.

    The database's clock, and the process's monotonic clock, are left as they are, as with a host whose
    wall clock is off.
    """
    real = functools.partial(datetime.now, UTC)

    def skewed() -> datetime:
        return real() + timedelta(seconds=seconds)

    for name, module in list(sys.modules.items()):
        if (name.startswith(("saga", "storage")) or name == "saga") and hasattr(module, "_utc_now"):
            module._utc_now = skewed  # type: ignore[attr-defined]
    clock_module = sys.modules.get("saga.clock")
    if clock_module is not None:  # the clock's own fallback, used until it reads the database's time
        kwdefaults = clock_module.DatabaseClock.__init__.__kwdefaults__
        if kwdefaults is not None and "fallback" in kwdefaults:
            kwdefaults["fallback"] = skewed


def crash_before_publish(times: int) -> None:
    """Exit (``os._exit``) the first ``times`` times commands were stored and are about to be published:
    the rows stay claimed by this process, unsent, until their lease ends."""
    from saga.driver import ExecutionDriver

    original = ExecutionDriver._flush_outbox
    left = [times]

    async def flush(self: Any, *args: Any, **kwargs: Any) -> None:
        if left[0] > 0:
            left[0] -= 1
            say("CRASH before_publish")
            os._exit(9)
        await original(self, *args, **kwargs)

    ExecutionDriver._flush_outbox = flush  # type: ignore[method-assign]


async def orchestrator(config: Mapping[str, Any]) -> None:
    if config.get("skew_seconds"):
        skew_wall_clock(float(config["skew_seconds"]))
    if config.get("crash_before_publish"):
        crash_before_publish(int(config["crash_before_publish"]))
    engine = create_async_engine(config["database_url"], pool_size=5)
    storage = SqlAlchemySagaStorage(config["database_url"], auto_migrate=False)
    # Settings this version of the pool does not know are left out (a run against an older one).
    known = {f.name for f in dataclasses.fields(KafkaSettings)}
    overrides = {k: v for k, v in config.get("kafka", {}).items() if k in known}
    pool = KafkaBrokerPool(
        bootstrap_servers=config["bootstrap"], client_id=f"fault-{config['name']}", **overrides
    )
    manager = SagaManager(
        storage,
        pool,
        service_name=f"faultorch{config['suffix']}",
        owner=f"{config['name']}:{os.getpid()}",
        lease_seconds=float(config.get("lease_seconds", 30)),
        relay_interval=float(config.get("relay_interval", 0.5)),
        wait_poll_interval=0.2,
    )
    for saga in sagas(config["suffix"], engine):
        manager.register(saga)
    await manager.setup()
    recovery = None
    if config.get("recovery") is not None:
        options = {"interval": 0.5, **config["recovery"]}
        recovery = SagaRecoveryWorker(manager, **options)
        await recovery.start()
    stop = stop_event()
    say("READY")
    pending = [asyncio.create_task(_run(manager, run)) for run in config.get("runs", [])]
    if config.get("runs_one_by_one"):
        for task in pending:
            await task
    await asyncio.gather(*pending)
    say("RUNS DONE")
    await stop.wait()
    if recovery is not None:
        await recovery.stop(grace=5)
    await manager.destroy()
    await engine.dispose()


async def _run(manager: SagaManager, run: Mapping[str, Any]) -> None:
    await asyncio.sleep(float(run.get("after", 0)))
    context = dict(run.get("context", {}))
    context.setdefault("execution", str(uuid.uuid4()))
    context.setdefault("order", context["execution"])
    saga = manager.registry.get(run["saga"], 1)
    started = time.monotonic()
    try:
        execution = await manager.run(
            saga, context, pause_on_disk=bool(run.get("pause_on_disk", False)), raise_on_error=False
        )
    except Exception as exc:
        outcome = {"raised": type(exc).__name__, "error": str(exc)}
    else:
        outcome = {"id": str(execution.id), "status": str(execution.status.value), "error": execution.error}
    outcome.update(saga=run["saga"], tag=run.get("tag"), seconds=round(time.monotonic() - started, 3))
    say("RUN " + json.dumps(outcome, default=str))


# -- plumbing -------------------------------------------------------------------------------------------


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def main() -> None:
    role, config = sys.argv[1], json.loads(sys.argv[2])
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"%(asctime)s {config.get('name', role)} %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    from tests.e2e.faults._participant import participant

    roles = {"participant": participant, "orchestrator": orchestrator}
    asyncio.run(roles[role](config))


if __name__ == "__main__":
    main()
