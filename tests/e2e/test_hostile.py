"""Hostile-input suite: 10,000 malformed or misplaced records mixed into real traffic, on real Kafka and
PostgreSQL.

While an orchestrator process runs 300 order sagas against the inventory and payment participants, the
test publishes, in five waves, straight onto the orchestrator's reply topic and inventory's command topic
(a raw aiokafka producer, as a broken or malicious client would):

* random bytes, bad JSON, missing headers, forged headers (wrong kind, non-numeric status, non-UUID ids,
  values that are not UTF-8) — on both topics;
* replies naming executions that do not exist, and commands for executions that do not exist;
* replies to requests the saga never sent (old or forged request ids), some with an unknown status, and
  an unknown status sent to the very request a saga awaits;
* duplicates of real replies and commands, and real replies replayed in reverse order under other keys
  (so on other partitions: out of order).

Then: the consumers kept running (no process exited, all stop cleanly); every real saga ended as its order
says with every effect exactly once and one decision per participant (`tests.e2e.test_orders`); each
execution applied exactly the replies its path needs; and each hostile record met its fate
(`tests.e2e.chaos.hostile`): in the dead-letter topic with its reason, or recorded as an ignored reply,
or answered from the participant's dedup store without running its handler again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from saga.consumer import H_DEAD_LETTER_REASON
from saga.messages import H_EXECUTION_ID
from storage import TERMINAL_STATUSES, SqlAlchemySagaStorage, StorageError
from tests.e2e.chaos import common, harness
from tests.e2e.chaos.harness import ChaosApps
from tests.e2e.chaos.hostile import H_HOSTILE_ID, Bad, Factory
from tests.e2e.chaos.order_saga import orders
from tests.e2e.conftest import App
from tests.e2e.test_orders import Run, all_executions, check_everything
from tests.e2e.workload import Names

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e, pytest.mark.slow]

SAGAS = 300
RATE = 20.0
WAVES = 5
#: Hostile records per category over the whole run (10,000 in all).
PLAN = {
    "reply_malformed": 3000,
    "reply_unknown_execution": 1000,
    "reply_stale": 700,
    "reply_stale_unknown_status": 100,
    "reply_unknown_status": 100,
    "reply_duplicate": 300,
    "reply_out_of_order": 300,
    "command_malformed": 3000,
    "command_unknown_execution": 500,
    "command_duplicate": 1000,
}
DEADLINE = 150.0


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
    engine = create_async_engine(e2e_database)
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


class Tap:
    """Reads the real traffic of a few topics (no consumer group: it disturbs nobody)."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=None)
        self.records: dict[str, list[Any]] = defaultdict(list)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        await self.consumer.seek_to_beginning()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=200, max_records=1000)
            for records in batch.values():
                for record in records:
                    if H_HOSTILE_ID not in dict(record.headers or ()):
                        self.records[record.topic].append(record)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()


async def paused_awaits(engine: Any, limit: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(execution, awaited request) of executions paused right now, from their stored state."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT id, state FROM saga_executions WHERE status = 'paused' LIMIT :n"), {"n": limit}
        )
        out = []
        for execution_id, state in rows:
            awaiting = orjson.loads(state).get("await")
            if awaiting:
                out.append((uuid.UUID(str(execution_id)), uuid.UUID(awaiting["rid"])))
        return out


async def execution_ids(engine: Any) -> list[uuid.UUID]:
    async with engine.connect() as conn:
        return [uuid.UUID(str(r[0])) for r in await conn.execute(text("SELECT id FROM saga_executions"))]


def wave_share(total: int, wave: int) -> int:
    return total // WAVES + (1 if wave < total % WAVES else 0)


async def build_wave(factory: Factory, wave: int, tap: Tap, run: Run, rng: random.Random) -> list[Bad]:
    names = run.names
    bad: list[Bad] = []
    share = {kind: wave_share(total, wave) for kind, total in PLAN.items()}
    bad += [factory.reply_malformed() for _ in range(share["reply_malformed"])]
    bad += [factory.reply_unknown_execution() for _ in range(share["reply_unknown_execution"])]
    bad += [factory.command_malformed() for _ in range(share["command_malformed"])]
    bad += [factory.command_unknown_execution() for _ in range(share["command_unknown_execution"])]
    known = await execution_ids(run.engine)
    assert known, "no saga started yet"
    bad += [factory.reply_stale(rng.choice(known)) for _ in range(share["reply_stale"])]
    bad += [factory.reply_stale(rng.choice(known), 299) for _ in range(share["reply_stale_unknown_status"])]
    awaited = await paused_awaits(run.engine, share["reply_unknown_status"])
    bad += [factory.reply_unknown_status(e, r) for e, r in awaited]
    # Fewer sagas paused right now than planned: the rest are unknown statuses to requests never sent.
    bad += [
        factory.reply_stale(rng.choice(known), 299)
        for _ in range(share["reply_unknown_status"] - len(awaited))
    ]
    # Real replies only: the participant also answers the forged commands (untagged, unknown executions).
    real = {str(e).encode() for e in known}
    replies = [
        r for r in tap.records[names.orchestrator + "Reply"] if dict(r.headers).get(H_EXECUTION_ID) in real
    ]
    commands = tap.records[names.reserve_stock]
    assert replies and commands, "no real traffic seen yet"
    for _ in range(share["reply_duplicate"]):
        r = rng.choice(replies)
        bad.append(factory.copy("reply_duplicate", r.topic, r.key, r.value, list(r.headers)))
    recent = replies[-share["reply_out_of_order"] :]
    recent += [rng.choice(replies) for _ in range(share["reply_out_of_order"] - len(recent))]
    for r in reversed(recent):  # newest first, each under a key of its own: other partitions, other order
        bad.append(factory.copy("reply_out_of_order", r.topic, uuid.uuid4().bytes, r.value, list(r.headers)))
    for _ in range(share["command_duplicate"]):
        c = rng.choice(commands)
        bad.append(factory.copy("command_duplicate", c.topic, c.key, c.value, list(c.headers)))
    rng.shuffle(bad)
    return bad


async def publish(producer: AIOKafkaProducer, records: list[Bad]) -> None:
    futures = [
        await producer.send(b.topic, value=b.value, key=b.key, headers=b.wire_headers()) for b in records
    ]
    await asyncio.gather(*futures)


def check_alive(apps: list[App], all_apps: ChaosApps) -> None:
    dead = [a.name for a in apps if a.process.poll() is not None]
    if dead:
        pytest.fail(f"a consumer process exited under hostile input: {dead}\n{all_apps.report()}")


async def test_ten_thousand_hostile_records_mixed_into_real_traffic(
    run: Run, chaos_apps: ChaosApps, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    seed = int(os.environ.get("HOSTILE_SEED") or random.randrange(2**32))
    print(f"\nHOSTILE_SEED={seed}")
    rng = random.Random(seed)
    names = run.names
    reply_topic, command_topic = names.orchestrator + "Reply", names.reserve_stock
    factory = Factory(random.Random(rng.random()), reply_topic, command_topic)
    go = tmp_path / "go"
    orchestrator = chaos_apps.launch(
        "orchestrator",
        "tests.e2e.chaos.orchestrator",
        *run.args(),
        "--first",
        "0",
        "--count",
        str(SAGAS),
        "--rate",
        str(RATE),
        "--go-file",
        str(go),
    )
    await chaos_apps.wait_ready(orchestrator)
    consumers = list(chaos_apps.apps)
    tap = Tap(run.bootstrap, [reply_topic, command_topic])
    await tap.start()
    producer = AIOKafkaProducer(bootstrap_servers=run.bootstrap, acks="all", linger_ms=5)
    await producer.start()
    sent: list[Bad] = []
    timings: dict[str, float] = {}
    try:
        go.write_text("go")
        began = time.monotonic()
        for wave in range(WAVES):
            while not (tap.records[reply_topic] and tap.records[command_topic]):
                check_alive(consumers, chaos_apps)
                await asyncio.sleep(0.2)
            records = await build_wave(factory, wave, tap, run, rng)
            t0 = time.monotonic()
            await publish(producer, records)
            timings[f"wave_{wave}_publish"] = round(time.monotonic() - t0, 2)
            sent += records
            check_alive(consumers, chaos_apps)
            await asyncio.sleep(2.5)
        timings["published_by"] = round(time.monotonic() - began, 1)

        # Every real saga ends; every hostile record reaches its dead-letter topic (or is recorded).
        expected_letters = {
            "orchestrator": sum(1 for b in sent if b.fate == "dead_letter" and b.topic == reply_topic)
            + sum(1 for b in sent if b.fate == "reply_dead_lettered"),
            "inventory": sum(1 for b in sent if b.fate == "dead_letter" and b.topic == command_topic),
        }
        dead_letter_topics = {
            "orchestrator": names.orchestrator + "DeadLetter",
            "inventory": names.inventory + "DeadLetter",
        }
        # The consumers handle records concurrently, so dead letters complete while a recorded reply may still
        # be on its way: settled means every hostile record has reached its fate.
        letters: dict[str, list[Any]] = {}
        failures: list[str] = ["not settled yet"]
        fates: Counter[str] = Counter()
        while True:
            check_alive(consumers, chaos_apps)
            try:
                counts = await run.storage.count_by_status()
            except StorageError:
                counts = {}
            terminal = sum(n for s, n in counts.items() if s in TERMINAL_STATUSES)
            if terminal == SAGAS == sum(counts.values()):
                letters = {
                    side: await harness.read_topic(run.bootstrap, topic)
                    for side, topic in dead_letter_topics.items()
                }
                if all(len(letters[side]) >= n for side, n in expected_letters.items()):
                    replies = await reply_rows(run.engine)
                    failures, fates = missed_fates(sent, letters, replies, reply_topic)
                    if not failures:
                        break
            if time.monotonic() - began > DEADLINE:
                got = {side: len(records) for side, records in letters.items()}
                pytest.fail(
                    f"after {DEADLINE}s: statuses {counts}, dead letters {got} of {expected_letters},"
                    f" {len(failures)} hostile records missed their fate, e.g.:\n"
                    + "\n".join(failures[:20])
                    + f"\n{chaos_apps.report()}"
                )
            await asyncio.sleep(1.0)
        timings["settled_by"] = round(time.monotonic() - began, 1)
    finally:
        await producer.stop()
        await tap.stop()

    assert len(sent) == sum(PLAN.values()) == 10_000
    # -- the real sagas --------------------------------------------------------------------------------
    workload = orders(SAGAS)
    measured = await check_everything(run, workload)
    executions = await all_executions(run.storage)
    wrong = harness.wrong_applied_replies(
        await harness.applied_reply_counts(run.engine), executions, workload
    )
    assert not wrong, f"executions that applied other replies than their own: {wrong[:5]}"

    # -- the hostile records (each reached its fate: the wait above checked them) ------------------------
    assert not failures
    assert not any(
        status == 299 and outcome == "applied" for rows in replies.values() for status, outcome in rows
    )

    # -- the consumers ------------------------------------------------------------------------------------
    stats: dict[str, Any] = {}
    for app in consumers:
        code = chaos_apps.stop(app)
        assert code == 0, f"{app.name} exited {code}\n{chaos_apps.report()}"
        stats[app.name] = orjson.loads(app.stats() or "{}")
    consumer = stats["orchestrator"]["consumer"]
    inventory = stats["inventory"]
    malformed_replies = sum(1 for b in sent if b.kind.startswith("reply_") and b.fate == "dead_letter")
    assert consumer["malformed"] >= malformed_replies - PLAN["reply_unknown_execution"]
    assert (
        consumer["unknown_execution"] >= PLAN["reply_unknown_execution"] + PLAN["command_unknown_execution"]
    )
    assert inventory["duplicates"] >= PLAN["command_duplicate"]
    summary = {
        "seed": seed,
        "sagas": SAGAS,
        "hostile_records": len(sent),
        "by_kind": dict(Counter(b.kind for b in sent)),
        "fates": dict(fates),
        "dead_letters": {side: len(records) for side, records in letters.items()},
        "timings": timings,
        "orchestrator_consumer": consumer,
        "inventory": {
            k: inventory[k] for k in ("handled", "duplicates", "dead_lettered", "dead_letter_reasons")
        },
        **measured,
    }
    record_property("hostile", summary)
    print(f"HOSTILE SUITE: {orjson.dumps(summary).decode()}")


def missed_fates(
    sent: list[Bad],
    letters: dict[str, list[Any]],
    replies: Mapping[Any, list[tuple[int, str]]],
    reply_topic: str,
) -> tuple[list[str], Counter[str]]:
    """The hostile records that have not reached their fate (yet), and how many reached each fate."""
    reasons: dict[str, list[tuple[str, str]]] = defaultdict(list)  # hostile id -> [(side, reason)]
    untagged: dict[str, list[str]] = defaultdict(list)  # execution id -> reasons (replies to forged commands)
    for side, records in letters.items():
        for record in records:
            headers = harness.headers_of(record)
            reason = headers.get(H_DEAD_LETTER_REASON, b"").decode(errors="replace")
            assert reason, f"a dead letter on the {side} side has no reason: {headers}"
            if H_HOSTILE_ID in headers:
                reasons[headers[H_HOSTILE_ID].decode()].append((side, reason))
            elif H_EXECUTION_ID in headers:
                untagged[headers[H_EXECUTION_ID].decode()].append(reason)
    failures: list[str] = []
    fates: Counter[str] = Counter()
    for b in sent:
        side = "orchestrator" if b.topic == reply_topic else "inventory"
        got = reasons.get(b.id, [])
        if b.fate == "dead_letter":
            ok = bool(got) and all(s == side and r.startswith(b.reason) for s, r in got)
        elif b.fate == "reply_dead_lettered":
            ok = not got and any(r == b.reason for r in untagged.get(str(b.execution_id), []))
        elif b.fate == "recorded":
            rows = replies.get((b.execution_id, b.request_id), [])
            ok = not got and any(outcome in b.outcomes for _, outcome in rows)
            ok = ok and sum(1 for _, outcome in rows if outcome == "applied") <= 1
            if b.kind.startswith("reply_stale"):
                ok = ok and all(outcome == "stale" for _, outcome in rows)
        elif b.fate == "dead_letter_or_recorded":
            rows = replies.get((b.execution_id, b.request_id), [])
            in_letters = bool(got) and all(r.startswith(b.reason) for _, r in got)
            recorded = any(status == 299 and outcome in b.outcomes for status, outcome in rows)
            ok = in_letters or recorded
            fates["unknown_status_dead_lettered" if in_letters else "unknown_status_recorded"] += 1
        else:
            # Answered from the dedup store: the participant re-sent the stored reply, which the orchestrator
            # recorded as a duplicate; the handler did not run again (the test's effect counts prove it).
            rows = replies.get((b.execution_id, b.request_id), [])
            ok = not got and any(outcome == "duplicate" for _, outcome in rows)
            ok = ok and sum(1 for _, outcome in rows if outcome == "applied") <= 1
        fates[b.fate] += 1
        if not ok:
            failures.append(f"{b.kind} {b.id} ({b.fate}, expected {b.reason!r}): got {got}")
    return failures, fates


async def reply_rows(engine: Any) -> dict[tuple[uuid.UUID, uuid.UUID], list[tuple[int, str]]]:
    """(execution, request) -> [(status, outcome)] of every reply the orchestrator recorded."""
    out: dict[tuple[uuid.UUID, uuid.UUID], list[tuple[int, str]]] = defaultdict(list)
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT execution_id, request_id, status, outcome FROM saga_replies"))
        for execution_id, request_id, status, outcome in rows:
            out[uuid.UUID(str(execution_id)), uuid.UUID(str(request_id))].append((int(status), str(outcome)))
    return out
