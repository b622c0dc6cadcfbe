"""Crash suite: 1,000 order sagas over real Kafka and PostgreSQL while orchestrators are SIGKILLed at random
moments, the Kafka broker is restarted once and PostgreSQL once.

Processes: the inventory and payment participants, and two orchestrators (`tests.e2e.chaos.orchestrator`,
each a SagaManager that consumes replies in one consumer group, relays its outbox and runs a
SagaRecoveryWorker: two orchestrators and two recovery workers at once). Each orchestrator starts half of
the orders at a steady rate, by idempotency key, so a restarted one carries on where its predecessor
stopped.

Chaos, from a seeded RNG (``CHAOS_SEED`` reproduces a schedule; the seed is printed):

* at least 20 SIGKILLs of an orchestrator, each restarted at once: plain kills at random times from the
  test, and kills at chosen windows by crash points armed in the new process (``CHAOS_CRASH``): right after
  a save carrying commands committed and before they are published, after a reply's transaction committed
  and before its offset is, while a reply is being applied, when a compensation starts or completes, and in
  the middle of a local step;
* ``scripts/services.sh restart-kafka`` once and ``restart-postgres`` once, mid-run.

Then every saga must reach a terminal status, and from the database:

* none is missing, none is duplicated, each ended as its order says (FINISHED, or ERRORED after
  compensation) — `tests.e2e.test_orders.check_everything`, which also proves that no participant effect
  happened twice (rows counted per idempotency key and per order, no unique constraint to hide a double)
  and that each participant got exactly one commit/reject per saga;
* no reply was applied twice: each execution applied exactly the replies its path needs;
* no step ran on two workers at once: the runs of each local step, recorded by the processes that ran them,
  never overlap between two processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from storage import TERMINAL_STATUSES, SqlAlchemySagaStorage, StorageError
from tests.e2e.chaos import common, harness
from tests.e2e.chaos.harness import ChaosApps, Restart, Slot
from tests.e2e.chaos.order_saga import orders
from tests.e2e.test_orders import Run, all_executions, check_everything
from tests.e2e.workload import Names

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e, pytest.mark.slow]

SAGAS = int(os.environ.get("CHAOS_SAGAS", "1000"))
#: Orchestrator kills (random-time SIGKILLs plus crash points); the issue asks for at least 20.
KILLS = int(os.environ.get("CHAOS_KILLS", "24"))
MIN_KILLS = min(20, KILLS)
#: Sagas started per second by each orchestrator.
RATE = float(os.environ.get("CHAOS_RATE", "10"))
#: When the services restart, in seconds after the orchestrators start.
KAFKA_RESTART_AT = 20.0
POSTGRES_RESTART_AT = 50.0
#: The chaos stops by then even if the kills fell short (the test then fails on MIN_KILLS).
CHAOS_MAX = 200.0
#: After the chaos, every saga must be terminal within this.
SETTLE_MAX = 180.0


@dataclass
class Services:
    bootstrap: str
    database_url: str

    @property
    def kafka(self) -> str:
        return harness.kafka_address(self.bootstrap)

    @property
    def postgres(self) -> str:
        return harness.postgres_address(self.database_url)

    def ensure(self) -> None:
        for kind, address in (("kafka", self.kafka), ("postgres", self.postgres)):
            harness.ensure_service(kind, address)


@pytest.fixture
def chaos_apps(e2e_database: str, tmp_path: Path) -> Any:
    apps = ChaosApps(tmp_path)
    try:
        yield apps
    finally:
        apps.stop_all()


@pytest.fixture
async def run(kafka_bootstrap: str, e2e_database: str, chaos_apps: ChaosApps) -> AsyncIterator[Run]:
    storage = SqlAlchemySagaStorage(e2e_database, auto_migrate=True)
    await storage.start()
    engine = create_async_engine(e2e_database, pool_pre_ping=True)
    await common.create_tables(engine)
    run = Run(Names(uuid.uuid4().hex[:10]), e2e_database, kafka_bootstrap, storage, engine, chaos_apps)
    try:
        for service in ("inventory", "payment"):
            chaos_apps.launch(service, "tests.e2e.chaos.participant", "--service", service, *run.args())
        await chaos_apps.wait_ready(*chaos_apps.apps)
        yield run
    finally:
        chaos_apps.stop_all()
        await storage.stop()
        await engine.dispose()
        with contextlib.suppress(Exception):  # best effort: a broker that is down keeps them
            await harness.delete_topics(kafka_bootstrap, run.names.suffix)


async def count_executions(storage: SqlAlchemySagaStorage) -> tuple[int, int, dict[str, int]] | None:
    """(total, terminal, by status), or ``None`` while the database is away."""
    try:
        counts = await storage.count_by_status()
    except StorageError:
        return None
    total = sum(counts.values())
    terminal = sum(n for status, n in counts.items() if status in TERMINAL_STATUSES)
    return total, terminal, {str(s): n for s, n in counts.items()}


class Chaos:
    """The schedule: random kills, crash-point restarts, the two service restarts."""

    def __init__(self, run: Run, apps: ChaosApps, services: Services, seed: int, go: Path) -> None:
        self.run = run
        self.apps = apps
        self.services = services
        self.rng = random.Random(seed)
        self.plan = harness.CrashPlan(random.Random(self.rng.random()))
        half = SAGAS // 2
        common_args = [*run.args(), "--rate", str(RATE), "--go-file", str(go)]
        self.slots = [
            Slot(apps, "orchestrator-a", [*common_args, "--first", "0", "--count", str(half)]),
            Slot(apps, "orchestrator-b", [*common_args, "--first", str(half), "--count", str(SAGAS - half)]),
        ]
        self.kills: list[tuple[str, str, float]] = []  # (slot, how, seconds into the run)
        self.restarts: dict[str, Restart | None] = {}
        self.restart_tasks: dict[str, asyncio.Task[Restart | None]] = {}
        self.open = True
        self.began = time.monotonic()
        self.next_kill = self.rng.uniform(2.0, 4.0)
        self.participants = list(apps.apps)

    def now(self) -> float:
        return time.monotonic() - self.began

    def arm(self) -> str | None:
        if not self.open:
            return None
        missing = [w for w, n in self.windows().items() if n == 0]
        return self.plan.next(missing) if missing or len(self.kills) < KILLS else None

    def windows(self) -> dict[str, int]:
        return harness.windows_hit(how for _, how, _ in self.kills)

    def start(self) -> None:
        for slot in self.slots:
            slot.start(self.arm())

    def check_participants(self) -> None:
        dead = [app for app in self.participants if app.process.poll() is not None]
        if dead:
            pytest.fail(f"participant died: {[a.name for a in dead]}\n{self.apps.report()}")

    def tick(self) -> None:
        """One pass of the monitor: reap, restart, kill, restart services."""
        self.check_participants()
        for slot in self.slots:
            ended = slot.reap()
            if ended is not None:
                if ended.how is None or not ended.how.startswith("crash:"):
                    pytest.fail(
                        f"{ended.app.name} ended by itself ({ended.how}) without a crash point\n"
                        f"{self.apps.report()}"
                    )
                self.kills.append((slot.name, ended.how, round(self.now(), 1)))
                slot.restart_at = self.now() + self.rng.uniform(0.2, 1.0)
            if slot.restart_at is not None and self.now() >= slot.restart_at:
                slot.start(self.arm())
        if not self.open:
            return
        if len(self.kills) < KILLS and self.now() >= self.next_kill:
            # Plain kills go to processes without a crash point, so those get to reach their window.
            alive = [s for s in self.slots if s.alive() and s.restart_at is None]
            # An armed process is killed only if it stays alive too long (no traffic reached its window).
            plain = [s for s in alive if s.current.crash is None or time.time() - s.current.started > 30]
            if plain:
                slot = self.rng.choice(plain)
                slot.kill()
                self.kills.append((slot.name, "sigkill", round(self.now(), 1)))
                slot.restart_at = self.now() + self.rng.uniform(0.2, 1.0)
                self.next_kill = self.now() + self.rng.uniform(1.5, 4.0)
        for kind, at, address in (
            ("kafka", KAFKA_RESTART_AT, self.services.kafka),
            ("postgres", POSTGRES_RESTART_AT, self.services.postgres),
        ):
            previous_done = kind == "kafka" or (
                "kafka" in self.restart_tasks and self.restart_tasks["kafka"].done()
            )
            if kind not in self.restart_tasks and self.now() >= at and previous_done:
                self.restart_tasks[kind] = asyncio.create_task(
                    asyncio.to_thread(harness.restart_service, kind, address)
                )

    def restarts_done(self) -> bool:
        done = all(k in self.restart_tasks and self.restart_tasks[k].done() for k in ("kafka", "postgres"))
        if done:
            for kind, task in self.restart_tasks.items():
                self.restarts[kind] = task.result()  # raises if the restart failed
        return done

    def close(self) -> None:
        """End the chaos: no more kills; armed processes are replaced by plain ones."""
        self.open = False
        for slot in self.slots:
            if slot.alive() and slot.current.crash is not None:
                slot.kill()
                self.kills.append((slot.name, "sigkill", round(self.now(), 1)))
                slot.start(None)

    def deaths(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for slot in self.slots:
            out.update(slot.deaths())
        return out


async def test_orchestrators_killed_services_restarted_no_saga_lost_nothing_doubled(
    run: Run, chaos_apps: ChaosApps, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(2**32))
    print(f"\nCHAOS_SEED={seed} (set it to replay this schedule)")
    services = Services(run.bootstrap, run.url)
    go = tmp_path / "go"
    chaos = Chaos(run, chaos_apps, services, seed, go)
    workload = orders(SAGAS)
    phases: dict[str, float] = {}
    try:
        chaos.start()
        await chaos_apps.wait_ready(*(slot.current.app for slot in chaos.slots), within=90)
        go.write_text("go")
        chaos.began = time.monotonic()
        counts = None
        last_count = 0.0
        while chaos.open:
            chaos.tick()
            if time.monotonic() - last_count > 1.0:
                counts = await count_executions(run.storage)
                last_count = time.monotonic()
            started_all = counts is not None and counts[0] == SAGAS
            windows_done = KILLS < 20 or all(chaos.windows().values())
            if started_all and len(chaos.kills) >= KILLS and windows_done and chaos.restarts_done():
                break
            if chaos.now() > CHAOS_MAX:
                break
            await asyncio.sleep(0.1)
        phases["chaos"] = round(chaos.now(), 1)
        while not chaos.restarts_done():  # a restart still running when time was up
            chaos.tick()
            await asyncio.sleep(0.2)
        chaos.close()
        settle_began = time.monotonic()
        while True:
            chaos.tick()
            counts = await count_executions(run.storage)
            if counts is not None and counts[0] == SAGAS and counts[1] == SAGAS:
                break
            if time.monotonic() - settle_began > SETTLE_MAX:
                pytest.fail(
                    f"after {SETTLE_MAX}s of calm: executions (total, terminal, by status) = {counts}; "
                    f"kills {chaos.kills}\n{chaos_apps.report()}"
                )
            await asyncio.sleep(0.5)
        phases["settle"] = round(time.monotonic() - settle_began, 1)
    finally:
        await asyncio.to_thread(services.ensure)

    # The checks read through a fresh storage and engine: the test's own connections died with PostgreSQL.
    async with SqlAlchemySagaStorage(run.url, auto_migrate=False) as storage:
        engine: AsyncEngine = create_async_engine(run.url, pool_pre_ping=True)
        checked = Run(run.names, run.url, run.bootstrap, storage, engine, chaos_apps)
        try:
            executions = await all_executions(storage)
            wrong_statuses = await harness.explain_wrong_statuses(storage, executions, workload)
            assert not wrong_statuses, f"seed {seed}: sagas that ended wrongly:\n{wrong_statuses}"
            measured = await check_everything(checked, workload)
            wrong = harness.wrong_applied_replies(
                await harness.applied_reply_counts(engine), executions, workload
            )
            assert not wrong, f"{len(wrong)} executions applied a reply twice or missed one, e.g. {wrong[:5]}"
            runs_checked, overlaps, open_alive = await harness.step_run_overlaps(engine, chaos.deaths())
            assert not overlaps, f"a step ran on two workers at once: {overlaps[:5]}"
            assert not open_alive, f"step runs never finished by a live process: {open_alive[:5]}"
            assert runs_checked >= SAGAS
        finally:
            await engine.dispose()

    kills = Counter(how for _, how, _ in chaos.kills)
    assert len(chaos.kills) >= MIN_KILLS, f"only {len(chaos.kills)} kills: {chaos.kills}"
    windows = chaos.windows()
    if KILLS >= 20:
        assert all(windows.values()), f"a crash window was never hit: {windows} (kills {chaos.kills})"
    for slot in chaos.slots:
        code = chaos_apps.stop(slot.current.app)
        assert code == 0, f"{slot.current.app.name} exited {code} on SIGTERM\n{chaos_apps.report()}"
    for app in chaos.participants:
        code = chaos_apps.stop(app)
        assert code == 0, f"{app.name} exited {code}\n{chaos_apps.report()}"
        stats = orjson.loads(app.stats() or "{}")
        assert stats.get("dead_lettered") == 0, f"{app.name} dead-lettered records: {stats}"
    restarts = {
        kind: None
        if r is None
        else {"seconds": round(r.seconds, 1), "old_pid": r.old_pid, "new_pid": r.new_pid, "log": r.log}
        for kind, r in chaos.restarts.items()
    }
    for kind, restart in chaos.restarts.items():
        if restart is None:
            print(
                f"NOTE: {kind} at {getattr(services, kind)} is not managed by scripts/services.sh, "
                "so it was not restarted"
            )
        else:
            assert restart.new_pid is not None and restart.new_pid != restart.old_pid, restart
    summary = {
        "seed": seed,
        "sagas": SAGAS,
        "kills": len(chaos.kills),
        "kills_by_kind": dict(kills),
        "crash_windows": windows,
        "kill_times": [t for _, _, t in chaos.kills],
        "restarts": restarts,
        "orchestrator_processes": sum(len(s.incarnations) for s in chaos.slots),
        "statuses": counts[2] if counts else None,
        "step_runs_checked": runs_checked,
        "phases_seconds": phases,
        **measured,
    }
    record_property("chaos", summary)
    print(f"CRASH SUITE: {orjson.dumps(summary).decode()}")
