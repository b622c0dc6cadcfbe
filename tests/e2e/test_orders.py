"""End to end on real Kafka and PostgreSQL: order sagas over orchestrator and participant processes.

Each test runs the inventory and payment participants and one or two orchestrators as OS processes, starts
200 order sagas (60 % succeed, 20 % are refused by payment with a 400, 10 % crash payment with a 500, 10 %
fail in the final local step), waits until every execution is terminal, and then checks, from the database:

* every saga ended as its order says (FINISHED, or ERRORED after compensation);
* every participant effect happened exactly once, by counting rows per (idempotency key, effect) and per
  order — the tables have no unique constraint that could hide a duplicate;
* each compensation ran exactly once where one was due, and nowhere else;
* each participant received exactly one decision per saga: commit when it finished, reject when it failed.
"""

from __future__ import annotations

import asyncio
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

from storage import TERMINAL_STATUSES, ExecutionQuery, ExecutionRecord, SqlAlchemySagaStorage
from tests.e2e import db
from tests.e2e.conftest import App, Apps
from tests.e2e.workload import Names, Order, orders

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]

SAGAS = 200
#: Budget for all sagas to end once the orchestrators are up; the whole test stays under ~2 minutes.
DEADLINE = 90.0


@dataclass
class Run:
    """One test's names, database handles and processes."""

    names: Names
    url: str
    bootstrap: str
    storage: SqlAlchemySagaStorage
    engine: AsyncEngine
    apps: Apps

    def args(self) -> list[str]:
        return ["--bootstrap", self.bootstrap, "--database-url", self.url, "--suffix", self.names.suffix]


@pytest.fixture
async def run(kafka_bootstrap: str, e2e_database: str, apps: Apps) -> AsyncIterator[Run]:
    """A migrated database with the participants' tables, and both participants running."""
    storage = SqlAlchemySagaStorage(e2e_database, auto_migrate=True)
    await storage.start()
    engine = create_async_engine(e2e_database)
    await db.create_tables(engine)
    run = Run(Names(uuid.uuid4().hex[:10]), e2e_database, kafka_bootstrap, storage, engine, apps)
    try:
        inventory = apps.start("inventory", "inventory", *run.args())
        payment = apps.start("payment", "payment", *run.args())
        await apps.wait_ready(inventory, payment)
        yield run
    finally:
        apps.stop_all()
        await storage.stop()
        await engine.dispose()


async def wait_until_terminal(run: Run, count: int) -> dict[str, int]:
    """Poll ``count_by_status`` until ``count`` executions exist and all are terminal."""
    deadline = time.monotonic() + DEADLINE
    while True:
        run.apps.check_alive()
        counts = await run.storage.count_by_status()
        total = sum(counts.values())
        terminal = sum(n for status, n in counts.items() if status in TERMINAL_STATUSES)
        if total == count and terminal == count:
            return {str(status): n for status, n in counts.items()}
        if time.monotonic() > deadline:
            pytest.fail(
                f"after {DEADLINE} s: {total}/{count} executions, {terminal} terminal: "
                f"{ {str(s): n for s, n in counts.items()} }\n{run.apps.report()}"
            )
        await asyncio.sleep(0.25)


async def wait_for_decisions(run: Run, expected: int) -> Counter[tuple[uuid.UUID, str, str]]:
    """Wait until ``expected`` decision rows exist (they follow the terminal save), then a quiet second."""
    deadline = time.monotonic() + 30
    while True:
        counts = await db.decision_counts(run.engine)
        if sum(counts.values()) >= expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.0)  # anything arriving late would be a duplicate: give it a chance to show
    return await db.decision_counts(run.engine)


async def all_executions(storage: SqlAlchemySagaStorage) -> list[ExecutionRecord]:
    rows: list[ExecutionRecord] = []
    while True:
        page = await storage.query(ExecutionQuery(offset=len(rows), limit=100))
        rows.extend(page.rows)
        if len(rows) >= page.total or not page.rows:
            return rows


async def check_everything(run: Run, workload: list[Order]) -> dict[str, object]:
    """The assertions shared by both tests; returns what was measured."""
    report = run.apps.report
    records = await all_executions(run.storage)
    by_key = {record.idempotency_key: record for record in records}
    assert len(records) == len(workload), f"{len(records)} executions for {len(workload)} orders\n{report()}"
    assert set(by_key) == {order.idempotency_key for order in workload}

    wrong_status = [
        (
            order.number,
            order.outcome.value,
            str(by_key[order.idempotency_key].status),
            by_key[order.idempotency_key].error,
        )
        for order in workload
        if by_key[order.idempotency_key].status is not order.expected_status
    ]
    assert not wrong_status, f"{len(wrong_status)} sagas ended wrongly, e.g. {wrong_status[:5]}\n{report()}"

    # Effects, per order: exactly the expected ones, each once (compensations included).
    effects = await db.effect_counts(run.engine)
    actual: dict[int, dict[tuple[str, str], int]] = {}
    for (order_no, service, effect), n in effects.items():
        actual.setdefault(order_no, {})[service, effect] = n
    wrong_effects = [
        (order.number, order.outcome.value, actual.get(order.number, {}), order.expected_effects)
        for order in workload
        if actual.get(order.number, {}) != order.expected_effects
    ]
    assert not wrong_effects, (
        f"{len(wrong_effects)} orders with wrong effects (order, outcome, got, expected), "
        f"e.g. {wrong_effects[:5]}\n{report()}"
    )
    # ... and per idempotency key: no command was executed twice.
    per_key = await db.effects_by_key(run.engine)
    repeated = {key: n for key, n in per_key.items() if n != 1}
    assert not repeated, f"effects recorded more than once per idempotency key: {list(repeated.items())[:5]}"

    # Decisions: each participant got exactly one per saga, commit or reject as the saga ended.
    decisions = await wait_for_decisions(run, 2 * len(workload))
    expected_decisions: Counter[tuple[uuid.UUID, str, str]] = Counter()
    for order in workload:
        action = "commit" if order.expected_status.value == "finished" else "reject"
        for service in db.SERVICES:
            expected_decisions[by_key[order.idempotency_key].id, service, action] = 1
    missing = expected_decisions - decisions
    extra = decisions - expected_decisions
    assert not missing and not extra, (
        f"decisions: {sum(missing.values())} missing (e.g. {list(missing.items())[:3]}), "
        f"{sum(extra.values())} unexpected (e.g. {list(extra.items())[:3]})\n{report()}"
    )
    return {
        "effect_rows": sum(effects.values()),
        "decision_rows": sum(decisions.values()),
        "compensations": sum(n for (_, _, effect), n in effects.items() if effect in ("release", "refund")),
    }


def stop_and_collect(apps: Apps, *names: App) -> dict[str, Any]:
    """Stop the apps gracefully (they must exit 0) and gather their ``STATS`` lines."""
    stats: dict[str, Any] = {}
    for app in names:
        code = apps.stop(app)
        assert code == 0, f"{app.name} exited with {code}\n{apps.report()}"
        line = app.stats()
        stats[app.name] = orjson.loads(line) if line else None
    return stats


def assert_no_dead_letters(stats: dict[str, Any], apps: Apps) -> None:
    """Nothing was malformed, failed or dead-lettered, on either side."""
    for name, app_stats in stats.items():
        assert isinstance(app_stats, dict), f"{name} printed no stats\n{apps.report()}"
        if "consumer" in app_stats:  # an orchestrator
            consumer = app_stats["consumer"]
            trouble = {k: consumer[k] for k in ("malformed", "failed", "dead_lettered", "unknown_execution")}
            assert not any(trouble.values()), f"{name} reply consumer trouble: {trouble}\n{apps.report()}"
        elif "dead_lettered" in app_stats:  # a participant
            assert app_stats["dead_lettered"] == 0, (
                f"{name} dead-lettered records: {app_stats}\n{apps.report()}"
            )


async def test_orders_end_to_end_one_orchestrator(
    run: Run, record_property: Callable[[str, object], None]
) -> None:
    workload = orders(SAGAS)
    apps = run.apps
    orchestrator = apps.start(
        "orchestrator",
        "orchestrator",
        *run.args(),
        "--first",
        "0",
        "--count",
        str(SAGAS),
        "--concurrency",
        "50",
    )
    await apps.wait_ready(orchestrator)
    began = time.monotonic()
    statuses = await wait_until_terminal(run, SAGAS)
    elapsed = time.monotonic() - began
    measured = await check_everything(run, workload)
    inventory, payment = apps.apps[0], apps.apps[1]
    stats = stop_and_collect(apps, orchestrator, inventory, payment)
    assert_no_dead_letters(stats, apps)
    summary = {
        "sagas": SAGAS,
        "seconds_to_terminal": round(elapsed, 2),
        "statuses": statuses,
        **measured,
        **stats,
    }
    record_property("e2e", summary)
    print(f"\nE2E one orchestrator: {orjson.dumps(summary).decode()}")


async def test_orders_end_to_end_two_orchestrators_in_one_group(
    run: Run, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    workload = orders(SAGAS)
    apps = run.apps
    go = tmp_path / "go"
    half = SAGAS // 2
    first = apps.start(
        "orchestrator-a",
        "orchestrator",
        *run.args(),
        "--name",
        "orchestrator-a",
        "--first",
        "0",
        "--count",
        str(half),
        "--go-file",
        str(go),
    )
    second = apps.start(
        "orchestrator-b",
        "orchestrator",
        *run.args(),
        "--name",
        "orchestrator-b",
        "--first",
        str(half),
        "--count",
        str(SAGAS - half),
        "--go-file",
        str(go),
    )
    await apps.wait_ready(first, second)
    go.write_text("go")
    began = time.monotonic()
    statuses = await wait_until_terminal(run, SAGAS)
    elapsed = time.monotonic() - began
    measured = await check_everything(run, workload)
    inventory, payment = apps.apps[0], apps.apps[1]
    stats = stop_and_collect(apps, first, second, inventory, payment)
    assert_no_dead_letters(stats, apps)
    # Both processes applied replies (the reply topic's partitions were split between them), and each
    # finished sagas the other one started.
    shares = {
        name: (stats[name]["consumer"]["applied"], stats[name]["ended_here_started_elsewhere"])
        for name in ("orchestrator-a", "orchestrator-b")
    }
    assert all(applied > 0 and foreign > 0 for applied, foreign in shares.values()), (
        f"(replies applied, sagas ended here but started by the other) per orchestrator: {shares}\n"
        f"{apps.report()}"
    )
    summary = {
        "sagas": SAGAS,
        "seconds_to_terminal": round(elapsed, 2),
        "statuses": statuses,
        **measured,
        **stats,
    }
    record_property("e2e", summary)
    print(f"\nE2E two orchestrators: {orjson.dumps(summary).decode()}")
