"""Participant crash suite: 1,000 sagas against participant services of two to three instances each, which
are SIGKILLed at least 20 times, join and leave during slow handlers, and receive compensations before
their forward commands.

Processes: every participant instance is ``kafka-saga participant`` (two services, inventory and payment,
each with a transactional store in PostgreSQL: `tests.e2e.participants.apps`). The orchestrator
(a `SagaManager` with its recovery worker) runs in the test process and is never killed: this suite is
about the participants.

Chaos, from a seeded RNG (``PARTICIPANT_CHAOS_SEED`` reproduces a schedule; the seed is printed):

* SIGKILLs of a random instance at random times, and kills by crash points armed in new instances
  (``PARTICIPANT_CRASH``): inside a handler after its effect and before its commit (``effect``), and after
  a reply's commit and before its publish (``publish``); each killed instance is replaced at once;
* joins and leaves: a third instance joins a service and leaves it again by SIGTERM a few seconds later,
  while one command in eight sleeps inside its handler for longer than the leave's grace;
* one saga in ten is a ``late_order``: its forward command is held back by the test until after its step
  timed out and its compensation was sent, so the compensation reaches the participant first.

Then every saga must be terminal as its order says, and from the participants' effect table (no unique
constraint): no effect happened twice, and no effect stayed in place after its compensation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from saga import SagaManager, SagaRecoveryWorker
from storage import TERMINAL_STATUSES, SqlAlchemySagaStorage
from tests.e2e.chaos.common import kafka_pool
from tests.e2e.participants import orders as workload
from tests.e2e.participants.apps import Topics, metadata
from tests.e2e.participants.fleet import SERVICES, Fleet, Instance, write_config

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e, pytest.mark.slow]

SAGAS = int(os.environ.get("PARTICIPANT_CHAOS_SAGAS", "1000"))
MIN_KILLS = min(20, int(os.environ.get("PARTICIPANT_CHAOS_KILLS", "20")))
#: Sagas started per second.
RATE = float(os.environ.get("PARTICIPANT_CHAOS_RATE", "16"))
#: Seconds a slow handler sleeps inside its transaction (longer than the instances' grace of 0.5 s).
SLOW = 1.0
#: Seconds between two chaos actions.
CHAOS_EVERY = 2.5
CHAOS_MAX = 200.0
SETTLE_MAX = 120.0


async def delay_late_commands(bootstrap: str, names: Topics, stop: asyncio.Event) -> int:
    """Forward each command of the delay topic to the reserve topic `orders.LATE_DELAY` seconds late."""
    consumer = AIOKafkaConsumer(
        names.reserve_late,
        bootstrap_servers=bootstrap,
        group_id=f"delayer-{names.reserve_late}",
        auto_offset_reset="earliest",
        enable_auto_commit=True,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await consumer.start()
    await producer.start()
    forwarded = 0
    held: list[asyncio.Task[None]] = []

    async def forward(record: object) -> None:
        nonlocal forwarded
        await asyncio.sleep(workload.LATE_DELAY)
        await producer.send_and_wait(
            names.reserve,
            record.value,
            key=record.key,
            headers=list(record.headers),  # type: ignore[attr-defined]
        )
        forwarded += 1

    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    held.append(asyncio.create_task(forward(record)))
        await asyncio.gather(*held)
    finally:
        await consumer.stop()
        await producer.stop()
    return forwarded


def arm(rng: random.Random) -> str | None:
    """A crash point for a new instance (two in three get one), firing within its first commands."""
    choice = rng.random()
    if choice < 0.33:
        return f"effect:{rng.randint(2, 25)}"
    if choice < 0.66:
        return f"publish:{rng.randint(2, 25)}"
    return None


async def test_participants_survive_kills_joins_leaves_and_early_compensations(
    e2e_database: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("PARTICIPANT_CHAOS_SEED", str(random.randrange(1 << 30))))
    print(f"\nPARTICIPANT_CHAOS_SEED={seed}")
    rng = random.Random(seed)
    suffix = uuid.uuid4().hex[:8]
    names = Topics(suffix)
    engine = create_async_engine(e2e_database, pool_size=5)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    configs = {s: write_config(tmp_path, s, suffix, kafka_bootstrap, e2e_database) for s in SERVICES}
    fleet = Fleet(tmp_path, suffix, configs)
    storage = SqlAlchemySagaStorage(e2e_database, pool_size=10)
    manager = SagaManager(
        storage,
        kafka_pool(kafka_bootstrap, f"orders-{suffix}"),
        service_name=names.orchestrator,
        lease_seconds=3.0,
        relay_interval=0.2,
    )
    for saga in workload.sagas(names):
        manager.register(saga)
    stop_delayer = asyncio.Event()
    delayer: asyncio.Task[int] | None = None
    recovery: SagaRecoveryWorker | None = None
    kills: Counter[str] = Counter()
    joins = leaves = 0
    try:
        await manager.setup()
        recovery = SagaRecoveryWorker(manager, interval=0.5, lease_seconds=3.0, max_recovery_attempts=50)
        await recovery.start()
        delayer = asyncio.create_task(delay_late_commands(kafka_bootstrap, names, stop_delayer))
        first = [fleet.start(s) for s in SERVICES for _ in range(2)]
        await fleet.wait_ready(*first)

        orders = workload.workload(SAGAS, seed, SLOW)
        started = asyncio.Event()

        async def start_orders() -> None:
            slots = asyncio.Semaphore(20)

            async def one(order: workload.Order) -> None:
                async with slots:
                    await manager.run(
                        manager.registry.get(order.saga, 1),
                        order.context(),
                        pause_on_disk=True,
                        raise_on_error=False,
                        idempotency_key=order.idempotency_key,
                    )

            tasks = []
            for order in orders:
                tasks.append(asyncio.create_task(one(order)))
                await asyncio.sleep(1.0 / RATE)
            await asyncio.gather(*tasks)
            started.set()

        starting = asyncio.create_task(start_orders())
        leaving: list[tuple[float, Instance]] = []
        chaos_started = time.monotonic()
        next_action = chaos_started + CHAOS_EVERY
        while not (started.is_set() and sum(kills.values()) >= MIN_KILLS):
            assert time.monotonic() - chaos_started < CHAOS_MAX, f"chaos overran: kills {dict(kills)}"
            if starting.done() and starting.exception() is not None:
                raise starting.exception()  # type: ignore[misc]
            await asyncio.sleep(0.2)
            # Instances that killed themselves at their crash point are replaced.
            for instance in fleet.instances:
                if not instance.ended_by_test and not instance.alive():
                    instance.ended_by_test = True
                    point = instance.crashed_at_point()
                    assert point is not None, f"{instance.name} died unasked\n{fleet.report()}"
                    kills[point] += 1
                    fleet.start(instance.service, arm(rng))
            for at, instance in list(leaving):
                if time.monotonic() >= at:
                    leaving.remove((at, instance))
                    fleet.terminate(instance)
                    leaves += 1
            if time.monotonic() < next_action:
                continue
            next_action = time.monotonic() + CHAOS_EVERY * rng.uniform(0.6, 1.4)
            service = rng.choice(SERVICES)
            alive = fleet.alive(service)
            if rng.random() < 0.3 and len(alive) < 3:
                joined = fleet.start(service)
                joins += 1
                leaving.append((time.monotonic() + rng.uniform(2.0, 4.0), joined))
            elif alive:
                victim = rng.choice(alive)
                fleet.kill(victim)
                kills["random"] += 1
                if len(fleet.alive(service)) < 2:
                    fleet.start(service, arm(rng))
        for _, instance in leaving:
            fleet.terminate(instance)
        # Settle with instances that crash no more.
        for service in SERVICES:
            while len(fleet.alive(service)) < 2:
                fleet.start(service)
        crashing = [i for i in fleet.instances if i.alive() and i.crash]
        for instance in crashing:
            fleet.kill(instance)
            kills["random"] += 1
            fleet.start(instance.service)
        settle_deadline = time.monotonic() + SETTLE_MAX
        statuses: dict[str, tuple[str, str]] = {}
        errors: dict[str, object] = {}
        while True:
            async with engine.connect() as conn:
                rows = (
                    await conn.execute(text("SELECT idempotency_key, id, status, error FROM saga_executions"))
                ).all()
            statuses = {r[0]: (str(r[1]), r[2]) for r in rows}
            errors = {r[0]: r[3] for r in rows}
            pending = [k for k, (_, s) in statuses.items() if s not in {t.value for t in TERMINAL_STATUSES}]
            if len(statuses) == SAGAS and not pending:
                break
            assert time.monotonic() < settle_deadline, (
                f"{len(pending)} sagas not terminal, {SAGAS - len(statuses)} missing\n{fleet.report()}"
            )
            await asyncio.sleep(0.5)
        stop_delayer.set()
        forwarded = await delayer
        delayer = None

        # -- checks ---------------------------------------------------------------------------------------
        async with engine.connect() as conn:
            effect_rows = (
                await conn.execute(text("SELECT execution_id, service, effect FROM participant_effects"))
            ).all()
            tombstones = (
                await conn.execute(
                    text("SELECT count(*) FROM saga_participant_steps WHERE state = 'tombstone'")
                )
            ).scalar_one()
        per_execution: dict[str, Counter[tuple[str, str]]] = {}
        for execution_id, service, effect in effect_rows:
            per_execution.setdefault(execution_id, Counter())[(service, effect)] += 1
        wrong_status, doubled, left_in_place, unexpected = [], 0, 0, []
        for order in orders:
            execution_id, status = statuses[order.idempotency_key]
            expected_status = "finished" if order.outcome is workload.Outcome.GOOD else "errored"
            if status != expected_status:
                wrong_status.append(
                    (order.number, order.outcome.value, status, errors[order.idempotency_key])
                )
            found = per_execution.get(execution_id, Counter())
            doubled += sum(1 for n in found.values() if n > 1)
            for service, forward, undo in (
                ("inventory", "reserve", "release"),
                ("payment", "charge", "refund"),
            ):
                if (
                    order.outcome is not workload.Outcome.GOOD
                    and found[(service, forward)] > found[(service, undo)]
                ):
                    left_in_place += 1
            expected = workload.EXPECTED_EFFECTS[order.outcome]
            late_undone = {("inventory", "reserve"): 1, ("inventory", "release"): 1}
            if dict(found) != expected and not (
                order.outcome is workload.Outcome.LATE and dict(found) == late_undone
            ):
                unexpected.append((order.number, order.outcome.value, dict(found)))
        outcomes = Counter(order.outcome.value for order in orders)
        late_tombstoned = sum(
            1
            for order in orders
            if order.outcome is workload.Outcome.LATE
            and not per_execution.get(statuses[order.idempotency_key][0])
        )
        print(
            f"FIGURES sagas={SAGAS} outcomes={dict(outcomes)} kills={dict(kills)} "
            f"total_kills={sum(kills.values())} joins={joins} leaves={leaves} "
            f"instances={len(fleet.instances)} "
            f"late_forwarded={forwarded} tombstones={tombstones} late_refused_by_tombstone={late_tombstoned} "
            f"doubled={doubled} left_in_place={left_in_place} wrong_status={len(wrong_status)} "
            f"effect_rows={len(effect_rows)}"
        )
        assert not wrong_status, wrong_status[:20]
        assert doubled == 0
        assert left_in_place == 0
        assert not unexpected, unexpected[:20]
        assert sum(kills.values()) >= MIN_KILLS
        assert kills["random"] >= 1 and kills["effect"] >= 1 and kills["publish"] >= 1, dict(kills)
        assert joins >= 1 and leaves >= 1
        assert tombstones >= 1 and late_tombstoned >= 1
        codes = fleet.stop_all()
        drained = [name for name, code in codes.items() if code == 0]
        assert drained, f"no instance drained cleanly on SIGTERM: {codes}"
    finally:
        stop_delayer.set()
        if delayer is not None:
            delayer.cancel()
            with contextlib.suppress(BaseException):
                await delayer
        fleet.stop_all()
        if recovery is not None:
            await recovery.stop()
        await manager.destroy()
        await engine.dispose()
