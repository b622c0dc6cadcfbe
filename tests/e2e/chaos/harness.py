"""Test-side helpers of the reliability suites: launching and killing apps, restarting the shared services,
reading dead-letter topics, and the checks that have no home in `tests.e2e.test_orders`.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.e2e.chaos.common import CRASH_ENV, CRASH_POINTS
from tests.e2e.chaos.order_saga import APPLIED_REPLIES
from tests.e2e.conftest import App, Apps
from tests.e2e.workload import Order

REPO = Path(__file__).resolve().parents[3]
SERVICES_SH = REPO / "scripts" / "services.sh"


# -- processes -------------------------------------------------------------------------------------------


class ChaosApps(Apps):
    """`Apps` that can launch any module (``tests.e2e.chaos.*``) with extra environment variables."""

    def launch(self, name: str, module: str, *args: str, env: dict[str, str] | None = None) -> App:
        stdout_path = self.directory / f"{name}.stdout"
        stderr_path = self.directory / f"{name}.stderr"
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if env is None or CRASH_ENV not in env:
            environ.pop(CRASH_ENV, None)
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=environ,
            )
        app = App(name, process, stdout_path, stderr_path)
        self.apps.append(app)
        return app


@dataclass
class Incarnation:
    """One process of an orchestrator slot, and how it ended."""

    app: App
    crash: str | None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    how: str | None = None  # "sigkill" (by the test), "crash:<point>" (its crash point), "exit <code>"


class Slot:
    """An orchestrator that the test keeps alive: restarted whenever it dies, killed when the test says."""

    def __init__(self, apps: ChaosApps, name: str, args: list[str]) -> None:
        self.apps = apps
        self.name = name
        self.args = args
        self.incarnations: list[Incarnation] = []
        self.restart_at: float | None = None

    @property
    def current(self) -> Incarnation:
        return self.incarnations[-1]

    def start(self, crash: str | None) -> Incarnation:
        number = len(self.incarnations) + 1
        env = {CRASH_ENV: crash} if crash else None
        app = self.apps.launch(
            f"{self.name}-{number}",
            "tests.e2e.chaos.orchestrator",
            *self.args,
            "--name",
            self.name,
            env=env,
        )
        self.incarnations.append(Incarnation(app, crash))
        self.restart_at = None
        return self.current

    def alive(self) -> bool:
        return bool(self.incarnations) and self.current.app.process.poll() is None

    def kill(self) -> Incarnation:
        """SIGKILL the current process (the test's own random kill)."""
        incarnation = self.current
        process = incarnation.app.process
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            incarnation.how = "sigkill"
        incarnation.ended = time.time()
        return incarnation

    def reap(self) -> Incarnation | None:
        """If the current process died on its own, record how; ``None`` if it still runs."""
        incarnation = self.current
        code = incarnation.app.process.poll()
        if code is None or incarnation.ended is not None:
            return None
        incarnation.ended = time.time()
        match = re.search(r"^CRASH (\w+) (\d+)$", incarnation.app.stdout(), re.MULTILINE)
        if code == -signal.SIGKILL and match:
            incarnation.how = f"crash:{match.group(1)}"
        else:
            incarnation.how = f"exit {code}"
        return incarnation

    def deaths(self) -> dict[int, float]:
        """pid -> when the test saw it dead (wall clock), for every ended incarnation."""
        return {i.app.pid: i.ended for i in self.incarnations if i.ended is not None}


#: The windows the issue names, each to be hit at least once by a crash point.
REQUIRED_WINDOWS = {
    "between a state commit and its publish": ("outbox_committed",),
    "during reply processing": ("reply_committed", "reply_applying"),
    "mid-compensation": ("compensation_started", "compensation_completed"),
}


class CrashPlan:
    """Crash points for new orchestrator processes: every point in turn (shuffled), on about half of them.

    The n of ``point:n`` is small, so the process dies at that point within seconds of traffic, before the
    test's own random kill reaches it.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.queue: list[str] = []

    def next(self, missing: Iterable[str] = ()) -> str | None:
        """The crash point of the next process; a window still ``missing`` (a `REQUIRED_WINDOWS` key)
        is armed first, and always."""
        missing = list(missing)
        if missing:
            point = self.rng.choice(REQUIRED_WINDOWS[self.rng.choice(missing)])
        elif self.rng.random() < 0.45:
            return None
        else:
            if not self.queue:
                self.queue = list(CRASH_POINTS)
                self.rng.shuffle(self.queue)
            point = self.queue.pop()
        high = 3 if point.startswith("compensation") else 12
        return f"{point}:{self.rng.randint(1, high)}"


def windows_hit(kinds: Iterable[str]) -> dict[str, int]:
    """How many crash-point kills fell in each window of `REQUIRED_WINDOWS`."""
    kinds = list(kinds)
    return {
        window: sum(1 for kind in kinds if kind.removeprefix("crash:") in points)
        for window, points in REQUIRED_WINDOWS.items()
    }


# -- services ---------------------------------------------------------------------------------------------


#: Seconds a restarted service may take to serve clients. The development broker keeps every test run's
#: topics, and loading thousands of partitions on a busy 2-core machine can outlast the script's 90 s.
READY_TIMEOUT = "240"


def _services(command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SERVICES_SH), command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        env={
            **os.environ,
            "KAFKA_SAGA_PYTHON": os.environ.get("KAFKA_SAGA_PYTHON", sys.executable),
            "KAFKA_SAGA_READY_TIMEOUT": os.environ.get("KAFKA_SAGA_READY_TIMEOUT", READY_TIMEOUT),
        },
    )


def script_address(kind: str) -> str:
    """Where ``scripts/services.sh`` runs the service (its ``env`` output)."""
    env = _services("env", 60).stdout
    if kind == "kafka":
        match = re.search(r"KAFKA_BOOTSTRAP_SERVERS=(\S+)", env)
        return match.group(1) if match else ""
    match = re.search(r"SAGA_DATABASE_URL=(\S+)", env)
    return postgres_address(match.group(1)) if match else ""


def service_pid(kind: str, address: str) -> int | None:
    """pid of the service ``scripts/services.sh`` runs at ``address``; ``None`` if the script does not run
    the service there (e.g. testcontainers, or an external broker).

    Raises:
        AssertionError: The script owns that address but reports no process for it.
    """
    if script_address(kind) != address:
        return None
    label = "kafka" if kind == "kafka" else "postgres"
    status = ""
    for _ in range(10):
        status = _services("status", 60).stdout
        match = re.search(
            rf"^{label}: (?:running|started but not answering) \(pid (\d+),", status, re.MULTILINE
        )
        if match:
            return int(match.group(1))
        time.sleep(1.0)
    raise AssertionError(f"scripts/services.sh runs {kind} at {address} but reports no process:\n{status}")


def kafka_address(bootstrap: str) -> str:
    return bootstrap.split(",")[0].strip()


def postgres_address(database_url: str) -> str:
    url = make_url(database_url)
    return f"{url.host}:{url.port or 5432}"


@dataclass
class Restart:
    kind: str
    began: float
    seconds: float
    old_pid: int
    new_pid: int | None
    log: list[str] = field(default_factory=list)  # what scripts/services.sh said, timestamped


def restart_service(kind: str, address: str) -> Restart | None:
    """Restart the shared service (``scripts/services.sh restart-kafka|restart-postgres``).

    Returns ``None`` (and does nothing) when the service at ``address`` was not started by the script
    (e.g. testcontainers): the suites then run without that fault and say so.
    """
    old = service_pid(kind, address)
    if old is None:
        return None
    began = time.time()
    result = _services(f"restart-{kind}", 600)
    seconds = time.time() - began
    if result.returncode != 0:
        ensure_service(kind, address)
        raise AssertionError(f"services.sh restart-{kind} failed:\n{result.stderr[-3000:]}")
    log = [line for line in result.stderr.splitlines() if line.startswith("[services ")]
    return Restart(kind, began, seconds, old, service_pid(kind, address), log)


def ensure_service(kind: str, address: str) -> None:
    """Start the service again if the script owns its address (idempotent: a running one is left alone)."""
    if script_address(kind) != address:
        return
    result = _services(f"start-{kind}", 600)
    if result.returncode != 0:
        print(f"WARNING: services.sh start-{kind} failed:\n{result.stderr[-2000:]}", file=sys.stderr)


# -- Kafka, raw ---------------------------------------------------------------------------------------------


async def read_topic(bootstrap: str, topic: str, *, settle: float = 0.0) -> list[Any]:
    """Every record of ``topic`` (all partitions, from the start to the current end), as aiokafka records."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, request_timeout_ms=30_000
    )
    await consumer.start()
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            (described,) = await admin.describe_topics([topic])
        finally:
            await admin.close()
        partitions = (
            {p["partition"] for p in described.get("partitions", ())}
            if described["error_code"] == 0
            else set()
        )
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records: list[Any] = []
        deadline = time.monotonic() + 120
        while True:
            positions = [await consumer.position(tp) for tp in tps]
            if all(position >= end[tp] for position, tp in zip(positions, tps, strict=True)):
                break
            assert time.monotonic() < deadline, f"reading {topic} took too long"
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for part in batch.values():
                records.extend(part)
        return records
    finally:
        await consumer.stop()


async def delete_topics(bootstrap: str, suffix: str) -> int:
    """Delete the topics of one test run (their names carry its random suffix); returns how many.

    The development broker keeps every topic it ever had, and the more partitions it holds the longer it
    takes to restart; the suites that restart it clean up after themselves.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if suffix in t]
        if topics:
            await admin.delete_topics(topics)
        return len(topics)
    finally:
        await admin.close()


def headers_of(record: Any) -> dict[str, bytes]:
    return {name: value for name, value in (record.headers or ())}


# -- checks -----------------------------------------------------------------------------------------------


async def applied_reply_counts(engine: AsyncEngine) -> dict[uuid.UUID, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT execution_id, count(*) FROM saga_replies WHERE outcome = 'applied' GROUP BY 1")
        )
        return {uuid.UUID(str(e)): int(n) for e, n in rows}


def wrong_applied_replies(
    counts: dict[uuid.UUID, int], executions: Iterable[Any], workload: Iterable[Order]
) -> list[tuple[int, str, int, int]]:
    """(order, outcome, applied, expected) for every execution that applied other than its replies."""
    by_key = {record.idempotency_key: record for record in executions}
    wrong = []
    for order in workload:
        record = by_key[order.idempotency_key]
        expected = APPLIED_REPLIES[order.outcome]
        got = counts.get(record.id, 0)
        if got != expected:
            wrong.append((order.number, order.outcome.value, got, expected))
    return wrong


@dataclass
class Overlap:
    order: int
    step: str
    first: tuple[int, float, float]
    second: tuple[int, float, float]


async def step_run_overlaps(
    engine: AsyncEngine, deaths: dict[int, float]
) -> tuple[int, list[Overlap], list[tuple[int, str, int]]]:
    """Step runs of one (order, step) by two processes at overlapping times.

    A run without ``finished`` belongs to a process that was killed in it: it is taken to last until the
    test saw that process dead. Returns (runs checked, overlaps, runs left open by a live process).
    """
    async with engine.connect() as conn:
        rows = (
            await conn.execute(text("SELECT order_no, step, pid, started, finished FROM chaos_step_runs"))
        ).all()
    groups: dict[tuple[int, str], list[tuple[int, float, float]]] = defaultdict(list)
    open_alive: list[tuple[int, str, int]] = []
    for order, step, pid, started, finished in rows:
        if finished is None:
            if pid not in deaths:
                open_alive.append((order, step, pid))
                continue
            finished = deaths[pid]
        groups[order, step].append((pid, started, finished))
    overlaps = []
    for (order, step), runs in groups.items():
        runs.sort(key=lambda r: r[1])
        for i, a in enumerate(runs):
            for b in runs[i + 1 :]:
                if b[1] >= a[2]:
                    break
                if a[0] != b[0]:
                    overlaps.append(Overlap(order, step, a, b))
    return len(rows), overlaps, open_alive


async def wait_quietly(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def explain_wrong_statuses(storage: Any, executions: Iterable[Any], workload: Iterable[Order]) -> str:
    """A post-mortem of every execution that did not end as its order says ("" when all did)."""
    by_key = {record.idempotency_key: record for record in executions}
    lines = []
    for order in workload:
        record = by_key.get(order.idempotency_key)
        if record is None:
            lines.append(f"order {order.number} ({order.outcome.value}): NO EXECUTION")
            continue
        if record.status is order.expected_status:
            continue
        lines.append(
            f"order {order.number} ({order.outcome.value}) execution {record.id}: {record.status}, "
            f"recovery attempts {record.recovery_attempts}, error {record.error}"
        )
        for step in record.steps:
            lines.append(
                f"    step {step.name} {step.phase} {step.status} attempts={step.attempts} "
                f"request={step.request_id} error={step.error}"
            )
        for reply in await storage.list_replies(record.id):
            lines.append(f"    reply {reply.request_id} {reply.status} {reply.outcome} {reply.reason}")
        if len(lines) > 200:
            break
    return "\n".join(lines)
