"""One contract suite for the `SagaStorage` port, run unchanged against every adapter.

Backends: in-memory, SQLite (a temporary file, through aiosqlite) and PostgreSQL (marker ``postgres``, in a
schema created for this test session so other suites sharing the database are untouched). Time-dependent
cases move ``updated_at``/``lease_until``/``created_at`` through the backend's harness instead of sleeping.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from storage import (
    ConcurrencyError,
    DuplicateIdempotencyKeyError,
    DuplicateReplyError,
    ExecutionNotFoundError,
    ExecutionQuery,
    ExecutionRecord,
    MemorySagaStorage,
    OutboxMessage,
    ReplyRecord,
    SagaStatus,
    SagaStorage,
    StepRecord,
    SupportsClaimMany,
    SupportsDefinitionCounts,
    SupportsLoadMany,
)
from storage.records import OutboxClaim

# -- backends ------------------------------------------------------------------------------------------


class Harness:
    """A storage under test plus the back door the clock-dependent cases need."""

    storage: SagaStorage

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def set_times(self, saga_id: uuid.UUID, **columns: datetime | None) -> None:
        """Overwrite ``updated_at`` / ``created_at`` / ``lease_until`` of one execution directly."""
        raise NotImplementedError

    async def expire_outbox_claims(self) -> None:
        """Make every relay's outbox lease run out now."""
        raise NotImplementedError

    async def close(self) -> None:
        await self.storage.stop()


class MemoryHarness(Harness):
    def __init__(self) -> None:
        self.memory = MemorySagaStorage()
        self.storage = self.memory

    async def set_times(self, saga_id: uuid.UUID, **columns: datetime | None) -> None:
        executions = self.memory._executions
        executions[saga_id] = dataclasses.replace(executions[saga_id], **columns)  # type: ignore[arg-type]

    async def expire_outbox_claims(self) -> None:
        for row in self.memory._outbox.values():
            if row.claimed_until is not None:
                row.claimed_until = self.now() - timedelta(seconds=1)


class SqlHarness(Harness):
    def __init__(self, storage: Any) -> None:
        self.sql = storage
        self.storage = storage

    async def set_times(self, saga_id: uuid.UUID, **columns: datetime | None) -> None:
        from sqlalchemy import update

        table = self.sql.tables.executions
        async with self.sql.engine.begin() as conn:
            await conn.execute(update(table).where(table.c.id == saga_id).values(**columns))

    async def delete_everything(self) -> None:
        """Empty the tables (the PostgreSQL schema lives for the whole session)."""
        async with self.sql.engine.begin() as conn:
            for table in self.sql.tables.executions.metadata.sorted_tables:
                await conn.execute(table.delete())

    async def expire_outbox_claims(self) -> None:
        from sqlalchemy import update

        table = self.sql.tables.outbox
        async with self.sql.engine.begin() as conn:
            await conn.execute(
                update(table)
                .where(table.c.claimed_until.is_not(None))
                .values(claimed_until=self.now() - timedelta(seconds=1))
            )


def _in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run blocking ``fn`` (which may call ``asyncio.run``) off the test's running event loop."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _pg_schema_url(database_url: str) -> Iterator[tuple[str, str]]:
    """Create a uniquely named schema for this session, migrate it, and drop it afterwards."""
    import asyncpg  # type: ignore[import-untyped]
    from sqlalchemy.engine import make_url

    from storage.migrate import upgrade

    schema = f"saga_contract_{uuid.uuid4().hex[:10]}"
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    _in_thread(asyncio.run, run(f"CREATE SCHEMA {schema}"))
    try:
        _in_thread(upgrade, database_url, schema=schema)
        yield database_url, schema
    finally:
        _in_thread(asyncio.run, run(f"DROP SCHEMA {schema} CASCADE"))


@pytest.fixture(scope="session")
def pg_contract(database_url: str) -> Iterator[tuple[str, str]]:
    yield from _pg_schema_url(database_url)


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    h: Harness
    if request.param == "memory":
        h = MemoryHarness()
    elif request.param == "sqlite":
        from storage import SqlAlchemySagaStorage

        h = SqlHarness(SqlAlchemySagaStorage(f"sqlite+aiosqlite:///{tmp_path / 'saga.db'}"))
    else:
        from storage import SqlAlchemySagaStorage

        url, schema = request.getfixturevalue("pg_contract")
        sql = SqlHarness(SqlAlchemySagaStorage(url, schema=schema, auto_migrate=False))
        await sql.delete_everything()
        h = sql
    await h.storage.start()
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
def storage(harness: Harness) -> SagaStorage:
    return harness.storage


# -- builders ------------------------------------------------------------------------------------------


def execution(
    *,
    name: str = "order",
    status: SagaStatus = SagaStatus.RUNNING,
    state: bytes = b'{"k": 1}',
    **changes: Any,
) -> ExecutionRecord:
    return ExecutionRecord(
        id=changes.pop("id", None) or uuid.uuid4(),
        name=name,
        definition_version=changes.pop("definition_version", 1),
        status=status,
        state=state,
        **changes,
    )


def message(n: int = 0) -> OutboxMessage:
    return OutboxMessage(topic="payments", key=b"k%d" % n, value=b"v%d" % n, headers={"n": str(n)})


def applied(saga_id: uuid.UUID, request_id: uuid.UUID) -> ReplyRecord:
    return ReplyRecord(execution_id=saga_id, request_id=request_id, status=200, outcome="applied")


async def unsent(storage: SagaStorage) -> list[Any]:
    """Every unsent outbox row, fetched with an already expired lease so it does not hide them."""
    return await storage.fetch_outbox(1000, owner="inspector", lease_seconds=-60)


# -- create / load / save ------------------------------------------------------------------------------


async def test_create_then_load_round_trips_every_field(storage: SagaStorage) -> None:
    started = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    step = StepRecord(
        name="reserve",
        kind="remote",
        phase="execute",
        status="failed",
        attempts=2,
        started_at=started,
        finished_at=started + timedelta(seconds=1),
        request_id=uuid.uuid4(),
        error={"type": "Boom", "message": "no stock", "status": 400},
    )
    deadline = datetime(2030, 1, 1, tzinfo=UTC)
    record = execution(
        state=b"\x00raw\xffbytes",
        steps=(step,),
        idempotency_key="key-1",
        user="alice",
        reply_deadline=deadline,
        error={"type": "X", "nested": {"a": [1, 2]}},
        version=42,
    )
    created = await storage.create(record)
    assert created.version == 1
    assert created.created_at is not None and created.created_at.tzinfo is not None
    assert created.updated_at is not None and created.updated_at.tzinfo is not None

    loaded = await storage.load(record.id)
    assert loaded == created
    assert loaded.state == b"\x00raw\xffbytes"
    assert loaded.steps == (step,)
    assert loaded.reply_deadline == deadline
    assert loaded.error == {"type": "X", "nested": {"a": [1, 2]}}
    assert (await storage.get_steps(record.id)) == [step]


async def test_load_missing_names_the_id(storage: SagaStorage) -> None:
    missing = uuid.uuid4()
    for call in (storage.load(missing), storage.get_steps(missing), storage.save(execution(id=missing))):
        with pytest.raises(ExecutionNotFoundError) as info:
            await call
        assert info.value.execution_id == missing
        assert str(missing) in str(info.value)


async def test_load_many_reads_the_known_executions_in_the_order_asked(storage: SagaStorage) -> None:
    assert isinstance(storage, SupportsLoadMany)
    first = await storage.create(execution())
    second = await storage.create(execution(status=SagaStatus.PAUSED, error={"type": "X"}))
    first = await storage.save(dataclasses.replace(first, state=b"2"))
    missing = uuid.uuid4()
    assert await storage.load_many([second.id, missing, first.id, second.id]) == [second, first]
    assert await storage.load_many([]) == []
    assert await storage.load_many([missing]) == []
    many = [(await storage.create(execution())).id for _ in range(30)]
    assert [r.id for r in await storage.load_many(many[::-1])] == many[::-1]
    # what comes back is a copy: changing it changes nothing stored
    (loaded,) = await storage.load_many([second.id])
    assert loaded.error is not None
    loaded.error["type"] = "changed"  # type: ignore[index]
    assert (await storage.load(second.id)).error == {"type": "X"}


async def test_save_bumps_version_and_updated_at(storage: SagaStorage) -> None:
    created = await storage.create(execution())
    saved = await storage.save(dataclasses.replace(created, status=SagaStatus.PAUSED, state=b"2"))
    assert saved.version == 2
    assert saved.status is SagaStatus.PAUSED
    assert saved.updated_at is not None and created.updated_at is not None
    assert saved.updated_at >= created.updated_at
    assert saved.created_at == created.created_at
    again = await storage.save(dataclasses.replace(saved, state=b"3"))
    assert again.version == 3
    assert await storage.load(created.id) == again


async def test_stale_save_raises_and_changes_nothing(storage: SagaStorage) -> None:
    created = await storage.create(execution())
    current = await storage.save(dataclasses.replace(created, state=b"new"))
    with pytest.raises(ConcurrencyError) as info:
        await storage.save(dataclasses.replace(created, state=b"lost"), outbox=[message()])
    assert info.value.execution_id == created.id
    assert info.value.expected_version == 1
    assert await storage.load(created.id) == current
    assert await unsent(storage) == []


async def test_values_json_cannot_hold_are_refused_and_change_nothing(storage: SagaStorage) -> None:
    created = await storage.create(execution())
    with pytest.raises(TypeError):
        await storage.save(dataclasses.replace(created, error={"exception": object()}))
    with pytest.raises(TypeError):
        await storage.create(execution(error={"exception": object()}))
    assert await storage.load(created.id) == created
    assert (await storage.query()).total == 1
    # and the storage is still fine afterwards
    assert (await storage.save(dataclasses.replace(created, error={"type": "X"}))).version == 2


async def test_idempotency_key_is_unique(storage: SagaStorage) -> None:
    first = await storage.create(execution(idempotency_key="start-1"))
    with pytest.raises(DuplicateIdempotencyKeyError) as info:
        await storage.create(execution(idempotency_key="start-1"), outbox=[message()])
    assert info.value.existing_id == first.id
    assert info.value.idempotency_key == "start-1"
    assert await storage.find_by_idempotency_key("start-1") == first
    assert await storage.find_by_idempotency_key("other") is None
    assert len(await unsent(storage)) == 0
    assert (await storage.query()).total == 1


async def test_idempotency_key_taken_by_another_saga_names_both(storage: SagaStorage) -> None:
    """Keys are unique across sagas: reusing one for another saga is refused, naming both sagas."""
    order = await storage.create(execution(name="order", idempotency_key="42"))
    with pytest.raises(DuplicateIdempotencyKeyError) as info:
        await storage.create(execution(name="refund", idempotency_key="42"), outbox=[message()])
    assert info.value.existing_id == order.id
    assert (info.value.existing_saga, info.value.saga) == ("order", "refund")
    assert "'order'" in str(info.value) and "'refund'" in str(info.value)
    found = await storage.find_by_idempotency_key("42")
    assert found is not None and found.name == "order"
    assert len(await unsent(storage)) == 0
    assert (await storage.query()).total == 1


async def test_count_by_definition(storage: SagaStorage) -> None:
    assert isinstance(storage, SupportsDefinitionCounts)
    await storage.create(execution(name="order", status=SagaStatus.PAUSED))
    await storage.create(execution(name="order", status=SagaStatus.PAUSED))
    await storage.create(
        dataclasses.replace(execution(name="order", status=SagaStatus.PAUSED), definition_version=2)
    )
    await storage.create(execution(name="refund", status=SagaStatus.FINISHED))
    assert await storage.count_by_definition() == {
        ("order", 1, SagaStatus.PAUSED): 2,
        ("order", 2, SagaStatus.PAUSED): 1,
        ("refund", 1, SagaStatus.FINISHED): 1,
    }


async def test_query_filters_paginates_and_counts(harness: Harness, storage: SagaStorage) -> None:
    base = harness.now() - timedelta(hours=1)
    ids = []
    for i, (name, status) in enumerate(
        [
            ("order", SagaStatus.RUNNING),
            ("order", SagaStatus.FINISHED),
            ("refund", SagaStatus.RUNNING),
            ("order", SagaStatus.PAUSED),
            ("refund", SagaStatus.FINISHED),
        ]
    ):
        rec = await storage.create(execution(name=name, status=status))
        await harness.set_times(rec.id, created_at=base + timedelta(minutes=i))
        ids.append(rec.id)

    everything = await storage.query()
    assert everything.total == 5
    assert [r.id for r in everything.rows] == ids[::-1]  # newest first

    orders = await storage.query(ExecutionQuery(names=["order"]))
    assert orders.total == 3 and {r.id for r in orders.rows} == {ids[0], ids[1], ids[3]}

    running = await storage.query(ExecutionQuery(statuses=[SagaStatus.RUNNING, SagaStatus.PAUSED]))
    assert [r.id for r in running.rows] == [ids[3], ids[2], ids[0]]

    both = await storage.query(ExecutionQuery(names=["refund"], statuses=[SagaStatus.FINISHED]))
    assert [r.id for r in both.rows] == [ids[4]]

    page = await storage.query(ExecutionQuery(offset=1, limit=2))
    assert page.total == 5 and [r.id for r in page.rows] == [ids[3], ids[2]]

    window = await storage.query(
        ExecutionQuery(created_after=base + timedelta(minutes=1), created_before=base + timedelta(minutes=3))
    )
    assert [r.id for r in window.rows] == [ids[2], ids[1]]

    recent = await storage.query(ExecutionQuery(updated_after=harness.now() - timedelta(minutes=5)))
    assert recent.total == 5
    assert (await storage.query(ExecutionQuery(updated_before=base))).total == 0

    assert await storage.count_by_status() == {
        SagaStatus.RUNNING: 2,
        SagaStatus.FINISHED: 2,
        SagaStatus.PAUSED: 1,
    }


async def test_query_admin_filters(harness: Harness, storage: SagaStorage) -> None:
    """Idempotency key, version, overdue and error text filters, keyset paging and a capped count."""
    now = harness.now()
    late = await storage.create(execution(status=SagaStatus.PAUSED, idempotency_key="order-7"))
    await harness.set_times(late.id, reply_deadline=now - timedelta(minutes=1))
    waiting = await storage.create(execution(status=SagaStatus.PAUSED, definition_version=2))
    await harness.set_times(waiting.id, reply_deadline=now + timedelta(hours=1))
    broken = await storage.create(
        execution(
            status=SagaStatus.DEAD_LETTER,
            error={"step": "pay", "error": "Card 50%_declined", "type": "compensation"},
        )
    )
    ended = await storage.create(execution(status=SagaStatus.FINISHED))
    for minute, rec in enumerate([late, waiting, broken, ended]):
        await harness.set_times(rec.id, created_at=now - timedelta(minutes=10 - minute))

    def ids(result: Any) -> list[uuid.UUID]:
        return [r.id for r in result.rows]

    assert ids(await storage.query(ExecutionQuery(idempotency_key="order-7"))) == [late.id]
    assert (await storage.query(ExecutionQuery(idempotency_key="nope"))).total == 0
    assert ids(await storage.query(ExecutionQuery(versions=[2]))) == [waiting.id]
    assert ids(await storage.query(ExecutionQuery(overdue=True))) == [late.id]
    assert ids(await storage.query(ExecutionQuery(overdue=False))) == [ended.id, broken.id, waiting.id]
    # case-insensitive, and LIKE's wildcards in the text are literal
    assert ids(await storage.query(ExecutionQuery(error_text="50%_DECL"))) == [broken.id]
    assert (await storage.query(ExecutionQuery(error_text="50%declined"))).total == 0
    assert (await storage.query(ExecutionQuery(error_text="pay"))).total == 1

    first = await storage.query(ExecutionQuery(limit=3))
    assert ids(first) == [ended.id, broken.id, waiting.id] and first.total == 4
    last = first.rows[-1]
    assert last.created_at is not None
    second = await storage.query(ExecutionQuery(limit=3, after=(last.created_at, last.id)))
    assert ids(second) == [late.id] and second.total == 4  # the total ignores the page position
    assert (await storage.query(ExecutionQuery(count_limit=2))).total == 2
    assert (await storage.query(ExecutionQuery(count_limit=10))).total == 4


async def test_outbox_backlog(storage: SagaStorage) -> None:
    from storage import SupportsOutboxBacklog

    assert isinstance(storage, SupportsOutboxBacklog)
    empty = await storage.outbox_backlog()
    assert (empty.rows, empty.oldest_age_seconds) == (0, None)
    await storage.create(execution(), outbox=[message(1), message(2)])
    waiting = await storage.outbox_backlog()
    assert waiting.rows == 2
    assert waiting.oldest_age_seconds is not None and 0.0 <= waiting.oldest_age_seconds < 3600
    rows = await storage.fetch_outbox(10, owner="relay")
    await storage.mark_outbox_sent([rows[0].id])
    assert (await storage.outbox_backlog()).rows == 1


async def test_list_outbox(storage: SagaStorage) -> None:
    from storage import SupportsListOutbox

    assert isinstance(storage, SupportsListOutbox)
    mine = await storage.create(execution(), outbox=[message(1), message(2)])
    await storage.create(execution(), outbox=[message(3)])
    rows = await storage.fetch_outbox(1, owner="relay")
    await storage.mark_outbox_sent([rows[0].id])
    listed = await storage.list_outbox(mine.id)
    assert [(r.topic, r.key, r.value, dict(r.headers)) for r in listed] == [
        ("payments", b"k1", b"v1", {"n": "1"}),
        ("payments", b"k2", b"v2", {"n": "2"}),
    ]
    assert await storage.list_outbox(uuid.uuid4()) == []


async def test_count_by_status_empty(storage: SagaStorage) -> None:
    assert await storage.count_by_status() == {}
    assert await storage.query() == type(await storage.query())(rows=[], total=0)


# -- recovery ------------------------------------------------------------------------------------------


async def test_set_recovery_attempts(storage: SagaStorage) -> None:
    rec = await storage.create(execution())
    await storage.set_recovery_attempts(rec.id, 3)
    loaded = await storage.load(rec.id)
    assert loaded.recovery_attempts == 3
    assert loaded.version == 2
    assert await storage.get_sagas_for_recovery(10, max_recovery_attempts=4) == [rec.id]
    await storage.set_recovery_attempts(rec.id, 4)  # the maximum excludes it
    assert await storage.get_sagas_for_recovery(10, max_recovery_attempts=4) == []
    await storage.set_recovery_attempts(rec.id, 0)  # and 0 brings it back
    assert await storage.get_sagas_for_recovery(10, max_recovery_attempts=4) == [rec.id]
    missing = uuid.uuid4()
    with pytest.raises(ExecutionNotFoundError) as info:
        await storage.set_recovery_attempts(missing, 1)
    assert info.value.execution_id == missing


async def test_increment_recovery_attempts(storage: SagaStorage) -> None:
    rec = await storage.create(execution())
    await storage.increment_recovery_attempts(rec.id)
    loaded = await storage.load(rec.id)
    assert (loaded.recovery_attempts, loaded.status, loaded.version) == (1, SagaStatus.RUNNING, 2)
    await storage.increment_recovery_attempts(rec.id, new_status=SagaStatus.FAILED)
    loaded = await storage.load(rec.id)
    assert (loaded.recovery_attempts, loaded.status, loaded.version) == (2, SagaStatus.FAILED, 3)
    await storage.increment_recovery_attempts(rec.id, SagaStatus.DEAD_LETTER)
    assert (await storage.load(rec.id)).status is SagaStatus.DEAD_LETTER
    with pytest.raises(ExecutionNotFoundError):
        await storage.increment_recovery_attempts(uuid.uuid4())


async def test_recovery_filters_by_saga_name(storage: SagaStorage) -> None:
    order = await storage.create(execution(name="order"))
    refund = await storage.create(execution(name="refund"))
    assert await storage.get_sagas_for_recovery(10, saga_name="order") == [order.id]
    assert await storage.get_sagas_for_recovery(10, saga_name="refund") == [refund.id]
    assert await storage.get_sagas_for_recovery(10, saga_name="nope") == []
    assert set(await storage.get_sagas_for_recovery(10)) == {order.id, refund.id}


async def test_recovery_attempts_boundary(storage: SagaStorage) -> None:
    at_max = await storage.create(execution(recovery_attempts=5))
    below = await storage.create(execution(recovery_attempts=4))
    assert await storage.get_sagas_for_recovery(10) == [below.id]  # default max is 5
    assert set(await storage.get_sagas_for_recovery(10, max_recovery_attempts=6)) == {at_max.id, below.id}
    assert await storage.get_sagas_for_recovery(10, max_recovery_attempts=4) == []


async def test_recovery_stale_after_limit_and_order(harness: Harness, storage: SagaStorage) -> None:
    now = harness.now()
    fresh = await storage.create(execution())
    ages = {}
    for minutes in (30, 10, 20):
        rec = await storage.create(execution())
        await harness.set_times(rec.id, updated_at=now - timedelta(minutes=minutes))
        ages[minutes] = rec.id
    oldest_first = [ages[30], ages[20], ages[10]]
    assert await storage.get_sagas_for_recovery(10) == [*oldest_first, fresh.id]
    assert await storage.get_sagas_for_recovery(10, stale_after_seconds=60) == oldest_first
    assert await storage.get_sagas_for_recovery(10, stale_after_seconds=15 * 60) == oldest_first[:2]
    assert await storage.get_sagas_for_recovery(2) == oldest_first[:2]
    assert await storage.get_sagas_for_recovery(2, stale_after_seconds=3600) == []


async def test_recovery_statuses(harness: Harness, storage: SagaStorage) -> None:
    picked = {}
    for status in SagaStatus:
        rec = await storage.create(execution(status=status))
        picked[status] = rec.id
    found = set(await storage.get_sagas_for_recovery(100))
    assert found == {picked[s] for s in (SagaStatus.RUNNING, SagaStatus.COMPENSATING, SagaStatus.FAILED)}


async def test_paused_only_after_reply_deadline(harness: Harness, storage: SagaStorage) -> None:
    no_deadline = await storage.create(execution(status=SagaStatus.PAUSED))
    waiting = await storage.create(
        execution(status=SagaStatus.PAUSED, reply_deadline=harness.now() + timedelta(hours=1))
    )
    assert await storage.get_sagas_for_recovery(10) == []
    overdue = await storage.save(
        dataclasses.replace(waiting, reply_deadline=harness.now() - timedelta(seconds=1))
    )
    assert await storage.get_sagas_for_recovery(10) == [overdue.id]
    assert no_deadline.id not in await storage.get_sagas_for_recovery(10)
    claimed = await storage.claim_for_recovery("w", limit=10, lease_seconds=30)
    assert [r.id for r in claimed] == [overdue.id]


# -- claims --------------------------------------------------------------------------------------------


async def test_claim_held_expired_and_same_owner(harness: Harness, storage: SagaStorage) -> None:
    rec = await storage.create(execution())
    mine = await storage.claim(rec.id, "a", lease_seconds=60)
    assert mine is not None
    assert mine.owner == "a" and mine.version == 2
    assert mine.lease_until is not None and mine.lease_until > harness.now() + timedelta(seconds=50)
    assert await storage.claim(rec.id, "b", lease_seconds=60) is None
    again = await storage.claim(rec.id, "a", lease_seconds=60)
    assert again is not None and again.owner == "a" and again.version == 3

    await harness.set_times(rec.id, lease_until=harness.now() - timedelta(seconds=1))
    taken = await storage.claim(rec.id, "b", lease_seconds=60)
    assert taken is not None and taken.owner == "b"
    # the old owner's in-hand record is fenced off by the version
    with pytest.raises(ConcurrencyError):
        await storage.save(dataclasses.replace(again, state=b"late"))
    with pytest.raises(ExecutionNotFoundError):
        await storage.claim(uuid.uuid4(), "a", lease_seconds=1)


async def test_claim_many_claims_what_a_single_claim_would(harness: Harness, storage: SagaStorage) -> None:
    assert isinstance(storage, SupportsClaimMany)
    free, held, expired, mine = [await storage.create(execution()) for _ in range(4)]
    assert await storage.claim(held.id, "b", lease_seconds=60) is not None
    assert await storage.claim(expired.id, "b", lease_seconds=60) is not None
    await harness.set_times(expired.id, lease_until=harness.now() - timedelta(seconds=1))
    first = await storage.claim(mine.id, "a", lease_seconds=60)
    assert first is not None
    missing = uuid.uuid4()
    claimed = await storage.claim_many(
        [mine.id, held.id, missing, free.id, expired.id, free.id], "a", lease_seconds=60
    )
    assert [r.id for r in claimed] == [mine.id, free.id, expired.id]  # order asked, each once
    for record in claimed:
        assert record.owner == "a" and record.lease_until is not None
        assert record.lease_until > harness.now() + timedelta(seconds=50)
        assert record == await storage.load(record.id)  # what is stored now, version bumped
    assert claimed[0].version == first.version + 1
    assert (await storage.load(held.id)).owner == "b"  # a live lease of another owner is untouched
    assert await storage.claim_many([], "a", lease_seconds=60) == []


async def test_save_keeps_a_given_claim(storage: SagaStorage) -> None:
    rec = await storage.create(execution())
    claimed = await storage.claim(rec.id, "a", lease_seconds=60)
    assert claimed is not None
    saved = await storage.save(dataclasses.replace(claimed, state=b"x"))
    assert saved.owner == "a" and saved.lease_until == claimed.lease_until
    loaded = await storage.load(rec.id)
    assert loaded.owner == "a" and loaded.lease_until == claimed.lease_until and loaded.state == b"x"
    assert await storage.claim(rec.id, "b", lease_seconds=60) is None


async def test_save_with_no_owner_releases_the_claim(storage: SagaStorage) -> None:
    rec = await storage.create(execution())
    claimed = await storage.claim(rec.id, "a", lease_seconds=60)
    assert claimed is not None
    saved = await storage.save(
        dataclasses.replace(claimed, owner=None, lease_until=claimed.lease_until, state=b"x")
    )
    assert saved.owner is None and saved.lease_until is None and saved.version == claimed.version + 1
    loaded = await storage.load(rec.id)
    assert loaded.owner is None and loaded.lease_until is None and loaded.state == b"x"
    taken = await storage.claim(rec.id, "b", lease_seconds=60)
    assert taken is not None and taken.owner == "b"


async def test_save_by_a_former_holder_cannot_release_the_new_claim(
    harness: Harness, storage: SagaStorage
) -> None:
    rec = await storage.create(execution())
    old = await storage.claim(rec.id, "a", lease_seconds=60)
    assert old is not None
    await harness.set_times(rec.id, lease_until=harness.now() - timedelta(seconds=1))
    taken = await storage.claim(rec.id, "b", lease_seconds=60)
    assert taken is not None
    with pytest.raises(ConcurrencyError):
        await storage.save(dataclasses.replace(old, owner=None, lease_until=None))
    loaded = await storage.load(rec.id)
    assert loaded.owner == "b" and loaded.lease_until == taken.lease_until


async def test_save_never_shortens_the_holders_renewed_lease(storage: SagaStorage) -> None:
    rec = await storage.create(execution())
    claimed = await storage.claim(rec.id, "a", lease_seconds=5)
    assert claimed is not None and claimed.lease_until is not None
    assert await storage.renew_claim(rec.id, "a", lease_seconds=600)  # a heartbeat; version unchanged
    renewed = (await storage.load(rec.id)).lease_until
    assert renewed is not None and renewed > claimed.lease_until
    saved = await storage.save(dataclasses.replace(claimed, state=b"x"))  # carries the older lease
    assert saved.owner == "a" and saved.lease_until == renewed
    assert (await storage.load(rec.id)).lease_until == renewed
    # a later lease given by the holder is taken
    later = renewed + timedelta(seconds=60)
    again = await storage.save(dataclasses.replace(saved, lease_until=later))
    assert again.lease_until == later


async def test_renew_and_release(harness: Harness, storage: SagaStorage) -> None:
    rec = await storage.create(execution())
    claimed = await storage.claim(rec.id, "a", lease_seconds=5)
    assert claimed is not None and claimed.lease_until is not None
    assert await storage.renew_claim(rec.id, "a", lease_seconds=600)
    renewed = await storage.load(rec.id)
    assert renewed.lease_until is not None and renewed.lease_until > claimed.lease_until
    assert renewed.version == claimed.version  # a heartbeat does not fence the holder off
    assert not await storage.renew_claim(rec.id, "b", lease_seconds=600)

    await storage.release_claim(rec.id, "b")  # not the holder: no-op
    assert (await storage.load(rec.id)).owner == "a"
    await storage.release_claim(rec.id, "a")
    released = await storage.load(rec.id)
    assert released.owner is None and released.lease_until is None
    assert not await storage.renew_claim(rec.id, "a", lease_seconds=600)
    assert await storage.claim(rec.id, "b", lease_seconds=60) is not None


async def test_claim_for_recovery_is_disjoint(harness: Harness, storage: SagaStorage) -> None:
    ids = {(await storage.create(execution())).id for _ in range(10)}
    held = await storage.create(execution())
    assert await storage.claim(held.id, "holder", lease_seconds=600) is not None

    first = await storage.claim_for_recovery("a", limit=6, lease_seconds=60)
    second = await storage.claim_for_recovery("b", limit=6, lease_seconds=60)
    assert len(first) == 6 and len(second) == 4
    assert {r.id for r in first} | {r.id for r in second} == ids
    assert all(r.owner == "a" for r in first) and all(r.owner == "b" for r in second)
    assert all(r.version == 2 for r in first + second)
    assert await storage.claim_for_recovery("c", limit=10, lease_seconds=60) == []

    # an expired lease makes the row claimable again
    victim = first[0].id
    await harness.set_times(victim, lease_until=harness.now() - timedelta(seconds=1))
    retaken = await storage.claim_for_recovery("c", limit=10, lease_seconds=60)
    assert [r.id for r in retaken] == [victim]


async def test_claim_for_recovery_concurrently(storage: SagaStorage) -> None:
    ids = {(await storage.create(execution())).id for _ in range(20)}
    batches = await asyncio.gather(
        *(storage.claim_for_recovery(f"w{i}", limit=3, lease_seconds=60) for i in range(10))
    )
    claimed = [r.id for batch in batches for r in batch]
    assert len(claimed) == len(set(claimed)) == 20
    assert set(claimed) == ids


async def test_claim_for_recovery_applies_the_recovery_filters(
    harness: Harness, storage: SagaStorage
) -> None:
    old = await storage.create(execution(name="order"))
    await harness.set_times(old.id, updated_at=harness.now() - timedelta(minutes=10))
    await storage.create(execution(name="order"))  # fresh
    await storage.create(execution(name="refund"))
    await storage.create(execution(name="order", recovery_attempts=5))
    await storage.create(execution(name="order", status=SagaStatus.FINISHED))
    got = await storage.claim_for_recovery(
        "w", limit=10, lease_seconds=30, stale_after_seconds=60, saga_name="order"
    )
    assert [r.id for r in got] == [old.id]


# -- outbox --------------------------------------------------------------------------------------------


async def test_outbox_written_with_state(storage: SagaStorage) -> None:
    created = await storage.create(execution(), outbox=[message(1)])
    await storage.save(dataclasses.replace(created, state=b"2"), outbox=[message(2), message(3)])
    rows = await storage.fetch_outbox(10, owner="relay")
    assert [(r.execution_id, r.topic, r.key, r.value, dict(r.headers)) for r in rows] == [
        (created.id, "payments", b"k%d" % n, b"v%d" % n, {"n": str(n)}) for n in (1, 2, 3)
    ]
    assert rows[0].id < rows[1].id < rows[2].id
    assert all(r.created_at.tzinfo is not None for r in rows)


async def test_outbox_claim_reports_ids_and_keeps_relays_off(harness: Harness, storage: SagaStorage) -> None:
    first = OutboxClaim("writer", 60)
    created = await storage.create(execution(), outbox=[message(1)], outbox_claim=first)
    second = OutboxClaim("writer", 60)
    saved = await storage.save(
        dataclasses.replace(created, state=b"2"), outbox=[message(2), message(3)], outbox_claim=second
    )
    assert saved.version == 2
    assert len(first.ids) == 1 and len(second.ids) == 2
    assert first.ids[0] < second.ids[0] < second.ids[1]
    # written claimed: a relay skips them while the writer's lease runs
    assert await storage.fetch_outbox(10, owner="relay", lease_seconds=60) == []
    await storage.mark_outbox_sent(first.ids + second.ids[:1])
    # the writer never marked the last one (a crash): a relay takes it once the lease is over
    await harness.expire_outbox_claims()
    left = await storage.fetch_outbox(10, owner="relay", lease_seconds=60)
    assert [(r.id, r.value) for r in left] == [(second.ids[1], b"v3")]


async def test_outbox_claim_of_a_failed_write_reports_nothing(storage: SagaStorage) -> None:
    created = await storage.create(execution())
    await storage.save(dataclasses.replace(created, state=b"2"))
    claim = OutboxClaim("writer", 60)
    with pytest.raises(ConcurrencyError):
        await storage.save(dataclasses.replace(created, state=b"3"), outbox=[message(9)], outbox_claim=claim)
    assert claim.ids == []
    assert await unsent(storage) == []


async def test_failed_save_with_reply_and_outbox_writes_neither(storage: SagaStorage) -> None:
    created = await storage.create(execution())
    current = await storage.save(dataclasses.replace(created, state=b"2"))
    claim = OutboxClaim("writer", 60)
    with pytest.raises(ConcurrencyError):
        await storage.save(
            dataclasses.replace(created, state=b"3"),
            outbox=[message(1), message(2)],
            reply=applied(created.id, uuid.uuid4()),
            outbox_claim=claim,
        )
    with pytest.raises(ExecutionNotFoundError):
        await storage.save(
            execution(), outbox=[message(3)], reply=applied(created.id, uuid.uuid4()), outbox_claim=claim
        )
    assert claim.ids == []
    assert await storage.list_replies(created.id) == []
    assert await unsent(storage) == []
    assert await storage.load(created.id) == current


async def test_outbox_claim_ids_follow_the_rows_order(harness: Harness, storage: SagaStorage) -> None:
    created = await storage.create(execution())
    claim = OutboxClaim("writer", 60)
    await storage.save(
        dataclasses.replace(created, state=b"2"),
        outbox=[message(n) for n in range(7)],
        reply=applied(created.id, uuid.uuid4()),
        outbox_claim=claim,
    )
    await harness.expire_outbox_claims()
    by_id = {r.id: r.value for r in await unsent(storage)}
    assert [by_id[i] for i in claim.ids] == [b"v%d" % n for n in range(7)]


async def test_save_with_outbox_and_reply_keeps_the_claim_rules(storage: SagaStorage) -> None:
    rec = await storage.create(execution())
    claimed = await storage.claim(rec.id, "a", lease_seconds=5)
    assert claimed is not None
    assert await storage.renew_claim(rec.id, "a", lease_seconds=600)
    renewed = (await storage.load(rec.id)).lease_until
    saved = await storage.save(
        dataclasses.replace(claimed, state=b"x"), outbox=[message()], reply=applied(rec.id, uuid.uuid4())
    )
    assert saved.owner == "a" and saved.lease_until == renewed  # never shortened
    released = await storage.save(
        dataclasses.replace(saved, owner=None), outbox=[message()], reply=applied(rec.id, uuid.uuid4())
    )
    assert released.owner is None and released.lease_until is None
    assert await storage.load(rec.id) == released


async def test_failed_save_leaves_no_outbox_row(storage: SagaStorage) -> None:
    created = await storage.create(execution())
    await storage.save(dataclasses.replace(created, state=b"2"))
    with pytest.raises(ConcurrencyError):
        await storage.save(dataclasses.replace(created, state=b"3"), outbox=[message(9)])
    assert await unsent(storage) == []


async def test_fetch_mark_sent_and_two_relays(harness: Harness, storage: SagaStorage) -> None:
    created = await storage.create(execution(), outbox=[message(n) for n in range(5)])
    a = await storage.fetch_outbox(3, owner="relay-a", lease_seconds=60)
    b = await storage.fetch_outbox(3, owner="relay-b", lease_seconds=60)
    assert len(a) == 3 and len(b) == 2
    assert {r.id for r in a}.isdisjoint(r.id for r in b)
    assert await storage.fetch_outbox(10, owner="relay-c") == []

    await storage.mark_outbox_sent([r.id for r in a])
    # b's rows come back once their lease is over; a's never do
    await harness.expire_outbox_claims()
    left = await storage.fetch_outbox(10, owner="relay-c", lease_seconds=60)
    assert sorted(r.id for r in left) == sorted(r.id for r in b)
    await storage.mark_outbox_sent([r.id for r in b])
    assert await unsent(storage) == []
    assert all(r.execution_id == created.id for r in a + b)


async def test_concurrent_relays_never_share_a_row(storage: SagaStorage) -> None:
    await storage.create(execution(), outbox=[message(n) for n in range(30)])
    batches = await asyncio.gather(
        *(storage.fetch_outbox(4, owner=f"relay-{i}", lease_seconds=60) for i in range(10))
    )
    got = [r.id for batch in batches for r in batch]
    assert len(got) == len(set(got)) == 30


# -- replies -------------------------------------------------------------------------------------------


async def test_duplicate_applied_reply_rolls_back_everything(storage: SagaStorage) -> None:
    created = await storage.create(execution())
    request_id = uuid.uuid4()
    first = await storage.save(
        dataclasses.replace(created, state=b"after-reply"), reply=applied(created.id, request_id)
    )
    with pytest.raises(DuplicateReplyError) as info:
        await storage.save(
            dataclasses.replace(first, state=b"applied-twice", status=SagaStatus.FINISHED),
            outbox=[message()],
            reply=applied(created.id, request_id),
        )
    assert (info.value.execution_id, info.value.request_id) == (created.id, request_id)
    assert await storage.load(created.id) == first
    assert await unsent(storage) == []
    assert [r.outcome for r in await storage.list_replies(created.id)] == ["applied"]
    # a different request of the same execution still applies
    other = await storage.save(
        dataclasses.replace(first, state=b"next"), reply=applied(created.id, uuid.uuid4())
    )
    assert other.version == first.version + 1


async def test_record_and_list_replies(storage: SagaStorage) -> None:
    created = await storage.create(execution())
    request_id = uuid.uuid4()
    await storage.save(created, reply=applied(created.id, request_id))
    at = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    ignored = [
        ReplyRecord(created.id, request_id, 200, "duplicate", reason="already applied"),
        ReplyRecord(created.id, uuid.uuid4(), 200, "stale", reason="not awaited", received_at=at),
        ReplyRecord(created.id, request_id, 302, "unknown_status"),
    ]
    for reply in ignored:
        await storage.record_reply(reply)
    await storage.record_reply(ReplyRecord(uuid.uuid4(), request_id, 200, "stale"))  # someone else's

    listed = await storage.list_replies(created.id)
    assert [(r.request_id, r.status, r.outcome, r.reason) for r in listed] == [
        (request_id, 200, "applied", None),
        *((r.request_id, r.status, r.outcome, r.reason) for r in ignored),
    ]
    assert all(r.received_at is not None and r.received_at.tzinfo is not None for r in listed)
    assert listed[2].received_at == at
    assert await storage.list_replies(uuid.uuid4()) == []


# -- participant side ----------------------------------------------------------------------------------


async def test_command_replies_first_write_wins(storage: SagaStorage) -> None:
    assert await storage.get_command_reply("cmd-1") is None
    await storage.put_command_reply("cmd-1", b'{"status": 200}')
    await storage.put_command_reply("cmd-1", b'{"status": 500}')
    assert await storage.get_command_reply("cmd-1") == b'{"status": 200}'
    assert await storage.get_command_reply("cmd-2") is None


async def test_lifecycle_is_idempotent_and_async_with(storage: SagaStorage) -> None:
    await storage.start()
    async with storage as entered:
        assert entered is storage
        assert isinstance(storage, SagaStorage)


# -- fencing and per-row outcomes ------------------------------------------------------------------------


def command(n: int, request_id: uuid.UUID, *, delay: float | None = None) -> OutboxMessage:
    """An outbox command for ``request_id`` (fenced by it)."""
    return OutboxMessage("payments", b"k%d" % n, b"v%d" % n, {"n": str(n)}, request_id, delay)


async def test_a_command_is_fetched_only_while_its_execution_awaits_its_request(storage: SagaStorage) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    created = await storage.create(
        dataclasses.replace(execution(), status=SagaStatus.PAUSED, awaiting_request=first),
        outbox=[command(1, first)],
    )
    assert created.awaiting_request == first
    assert (await storage.load(created.id)).awaiting_request == first
    # Moving past the request (to the next one) cancels its unsent row in the same save; the new one stays.
    moved = await storage.save(
        dataclasses.replace(created, awaiting_request=second), outbox=[command(2, second)]
    )
    assert moved.awaiting_request == second
    fetched = await storage.fetch_outbox(10, owner="relay")
    assert [(r.value, r.request_id) for r in fetched] == [(b"v2", second)]
    assert fetched[0].attempts == 0


async def test_a_save_that_awaits_nothing_cancels_every_unsent_command_but_decisions(
    storage: SagaStorage,
) -> None:
    request = uuid.uuid4()
    created = await storage.create(
        dataclasses.replace(execution(), status=SagaStatus.PAUSED, awaiting_request=request),
        outbox=[command(1, request), message(2)],  # message(2): no request id, never fenced
    )
    await storage.save(dataclasses.replace(created, status=SagaStatus.DEAD_LETTER, awaiting_request=None))
    assert [r.value for r in await storage.fetch_outbox(10, owner="relay")] == [b"v2"]


async def test_a_stale_command_is_never_fetched_even_if_not_cancelled(storage: SagaStorage) -> None:
    request = uuid.uuid4()
    # The execution never awaited this request (a row written by an older writer): it is left unpublished.
    await storage.create(execution(), outbox=[command(1, request)])
    assert await storage.fetch_outbox(10, owner="relay") == []


async def test_a_delayed_command_is_due_only_after_its_delay(harness: Harness, storage: SagaStorage) -> None:
    request = uuid.uuid4()
    claim = OutboxClaim("writer", 60)
    await storage.create(
        dataclasses.replace(execution(), status=SagaStatus.PAUSED, awaiting_request=request),
        outbox=[command(1, request, delay=30)],
        outbox_claim=claim,
    )
    assert len(claim.ids) == 1
    assert await storage.fetch_outbox(10, owner="relay") == []  # not due; and not the writer's to publish
    await harness.expire_outbox_claims()  # its "not before" is the claim column: now in the past
    assert [r.value for r in await storage.fetch_outbox(10, owner="relay")] == [b"v1"]


async def test_deferred_rows_back_off_and_count_their_attempts(
    harness: Harness, storage: SagaStorage
) -> None:
    from storage import SupportsOutboxOutcomes

    assert isinstance(storage, SupportsOutboxOutcomes)
    request = uuid.uuid4()
    await storage.create(
        dataclasses.replace(execution(), status=SagaStatus.PAUSED, awaiting_request=request),
        outbox=[command(1, request), message(2)],
    )
    rows = await storage.fetch_outbox(10, owner="relay", lease_seconds=0)
    await storage.defer_outbox({rows[0].id: 60.0})
    # The deferred row waits out its backoff; the other is not held up by it.
    assert [r.value for r in await storage.fetch_outbox(10, owner="relay", lease_seconds=60)] == [b"v2"]
    await harness.expire_outbox_claims()
    again = await storage.fetch_outbox(10, owner="relay")
    assert [(r.value, r.attempts) for r in again] == [(b"v1", 1), (b"v2", 0)]


async def test_a_rejected_row_leaves_the_queue(harness: Harness, storage: SagaStorage) -> None:
    from storage import SupportsOutboxOutcomes

    assert isinstance(storage, SupportsOutboxOutcomes)
    await storage.create(execution(), outbox=[message(1), message(2)])
    rows = await storage.fetch_outbox(10, owner="relay")
    await storage.reject_outbox({rows[0].id: {"type": "publish_rejected", "reason": "record_too_large"}})
    await harness.expire_outbox_claims()
    assert [r.value for r in await storage.fetch_outbox(10, owner="relay")] == [b"v2"]


async def test_database_time_is_the_clock_the_storage_writes(storage: SagaStorage) -> None:
    from storage import SupportsDatabaseTime

    assert isinstance(storage, SupportsDatabaseTime)
    before = await storage.database_time()
    created = await storage.create(execution())
    after = await storage.database_time()
    assert created.updated_at is not None and before.tzinfo is not None
    assert before <= created.updated_at <= after
