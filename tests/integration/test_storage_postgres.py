"""`SqlAlchemySagaStorage` against a real PostgreSQL: claim races, the migration path and the query plans.

Every test works in a schema of its own (created here, dropped afterwards), because the database is shared
with other suites.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import statistics
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from storage.migrate import upgrade_async
from storage.sql import SqlAlchemySagaStorage
from storage.sql.sessions import Plans
from storage.sql.statements import recovery_params

pytestmark = [pytest.mark.postgres]

WORKERS = 8
ROWS = 1000


def _dsn(database_url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _connect(database_url: str, schema: str | None = None) -> Any:
    import asyncpg  # type: ignore[import-untyped]

    settings = {"search_path": schema} if schema else None
    return await asyncpg.connect(_dsn(database_url), server_settings=settings)


@pytest.fixture
async def schema(database_url: str) -> AsyncIterator[str]:
    """An empty schema of this test's own."""
    name = f"saga_storage_{uuid.uuid4().hex[:10]}"
    conn = await _connect(database_url)
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
    finally:
        await conn.close()
    try:
        yield name
    finally:
        conn = await _connect(database_url)
        try:
            await conn.execute(f"DROP SCHEMA {name} CASCADE")
        finally:
            await conn.close()


async def _insert_stale(database_url: str, schema: str, rows: int, **columns: str) -> None:
    """Insert ``rows`` RUNNING executions last updated an hour ago, in one statement."""
    values = {
        "status": "'running'",
        "updated_at": "now() - interval '1 hour'",
        "owner": "NULL",
        "lease_until": "NULL",
        **columns,
    }
    conn = await _connect(database_url, schema)
    try:
        await conn.execute(
            "INSERT INTO saga_executions (id, name, definition_version, status, state, steps, version,"
            " recovery_attempts, owner, lease_until, created_at, updated_at)"
            f" SELECT gen_random_uuid(), 'order', 1, {values['status']}, '\\x7b7d'::bytea, '[]'::jsonb, 1, 0,"
            f" {values['owner']}, {values['lease_until']}, now() - interval '2 hours', {values['updated_at']}"
            f" FROM generate_series(1, {rows})"
        )
    finally:
        await conn.close()


# -- claim races ---------------------------------------------------------------------------------------


async def test_concurrent_recovery_workers_claim_each_row_once(database_url: str, schema: str) -> None:
    await upgrade_async(database_url, schema=schema)
    await _insert_stale(database_url, schema, ROWS)
    # Stale like the others, but its holder's lease outlives the test: nobody may take it.
    await _insert_stale(database_url, schema, 1, owner="'holder'", lease_until="now() + interval '1 hour'")
    conn = await _connect(database_url, schema)
    try:
        held = (await conn.fetchrow("SELECT id FROM saga_executions WHERE owner = 'holder'"))["id"]
    finally:
        await conn.close()

    storages = [
        SqlAlchemySagaStorage(database_url, schema=schema, auto_migrate=False, pool_size=2)
        for _ in range(WORKERS)
    ]
    claimed: Counter[uuid.UUID] = Counter()
    batches: list[int] = []

    async def worker(n: int, storage: SqlAlchemySagaStorage) -> None:
        empty = 0
        while empty < 2:  # SKIP LOCKED may hide rows a peer is claiming right now: look twice
            batch = await storage.claim_for_recovery(
                f"worker-{n}", limit=10, lease_seconds=600, stale_after_seconds=60
            )
            batches.append(len(batch))
            empty = 0 if batch else empty + 1
            for record in batch:
                assert record.owner == f"worker-{n}"
                claimed[record.id] += 1
            await asyncio.sleep(0)

    try:
        await asyncio.gather(*(s.start() for s in storages))
        await asyncio.gather(*(worker(n, s) for n, s in enumerate(storages)))
        # A second round without the staleness filter must not hand out any live claim either.
        again = await asyncio.gather(
            *(s.claim_for_recovery(f"late-{n}", limit=50, lease_seconds=60) for n, s in enumerate(storages))
        )
    finally:
        await asyncio.gather(*(s.stop() for s in storages))

    assert len(claimed) == ROWS
    assert set(claimed.values()) == {1}, [i for i, c in claimed.items() if c > 1][:5]
    assert held not in claimed
    assert max(batches) <= 10
    assert all(batch == [] for batch in again)

    conn = await _connect(database_url, schema)
    try:
        rows = await conn.fetch("SELECT owner, version FROM saga_executions")
    finally:
        await conn.close()
    owners = Counter(r["owner"] for r in rows)
    assert owners["holder"] == 1
    assert sum(c for o, c in owners.items() if o.startswith("worker-")) == ROWS
    assert {r["version"] for r in rows if r["owner"] != "holder"} == {2}


async def _insert_unsent(database_url: str, schema: str, rows: int) -> None:
    """Insert ``rows`` unsent, unclaimed outbox rows, in one statement."""
    conn = await _connect(database_url, schema)
    try:
        await conn.execute(
            "INSERT INTO saga_outbox (execution_id, topic, key, value, headers, created_at)"
            " SELECT gen_random_uuid(), 't', NULL, '\\x00'::bytea, '{}'::jsonb, now()"
            f" FROM generate_series(1, {rows})"
        )
    finally:
        await conn.close()


async def test_claims_take_at_most_limit_rows_under_any_plan(database_url: str, schema: str) -> None:
    """A claim's ``LIMIT`` bounds what it takes, even when the planner would rescan the row pick.

    Statistics gathered while each table held one row make the planner expect one row to update. With
    ``id IN (pick)`` it then chose a nested-loop semi-join with the pick on the inner side, rescanned for
    every outer row, and each rescan locked the next ``limit`` rows: a claim of 6 took all 11.
    """
    await upgrade_async(database_url, schema=schema)
    await _insert_stale(database_url, schema, 1)
    await _insert_unsent(database_url, schema, 1)
    conn = await _connect(database_url, schema)
    try:
        await conn.execute("ANALYZE saga_executions")
        await conn.execute("ANALYZE saga_outbox")
    finally:
        await conn.close()
    await _insert_stale(database_url, schema, 10)
    await _insert_unsent(database_url, schema, 10)

    storage = SqlAlchemySagaStorage(database_url, schema=schema, auto_migrate=False, pool_size=1)
    await storage.start()
    try:
        claimed = await storage.claim_for_recovery("a", limit=6, lease_seconds=60)
        rest = await storage.claim_for_recovery("b", limit=6, lease_seconds=60)
        fetched = await storage.fetch_outbox(6, owner="a", lease_seconds=60)
        left = await storage.fetch_outbox(6, owner="b", lease_seconds=60)
    finally:
        await storage.stop()
    assert (len(claimed), len(rest)) == (6, 5)
    assert (len(fetched), len(left)) == (6, 5)
    assert not {r.id for r in claimed} & {r.id for r in rest}
    assert not {r.id for r in fetched} & {r.id for r in left}


async def test_claim_of_one_execution_by_many_workers_has_one_winner(database_url: str, schema: str) -> None:
    await upgrade_async(database_url, schema=schema)
    await _insert_stale(database_url, schema, 1)
    storages = [
        SqlAlchemySagaStorage(database_url, schema=schema, auto_migrate=False) for _ in range(WORKERS)
    ]
    try:
        (saga_id,) = await storages[0].get_sagas_for_recovery(10)
        results = await asyncio.gather(
            *(s.claim(saga_id, f"w{n}", lease_seconds=60) for n, s in enumerate(storages))
        )
    finally:
        await asyncio.gather(*(s.stop() for s in storages))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert winners[0].version == 2


# -- round trips ---------------------------------------------------------------------------------------


async def test_single_statement_writes_are_one_statement_each(database_url: str, schema: str) -> None:
    """create/save without outbox or reply: one autocommit statement, no BEGIN/COMMIT around it (a save is a
    ``WITH``: its update and the cancel of commands it moved past)."""
    from storage import ExecutionRecord, OutboxMessage, SagaStatus

    await upgrade_async(database_url, schema=schema)
    async with SqlAlchemySagaStorage(database_url, schema=schema, pool_size=1) as storage:
        warm = await storage.create(ExecutionRecord(uuid.uuid4(), "order", 1, SagaStatus.RUNNING, b"{}"))
        await storage.save(warm, outbox=[OutboxMessage("t", None, b"v")])  # prepares every statement once
        queries = await _log_queries(storage)

        created = await storage.create(ExecutionRecord(uuid.uuid4(), "order", 1, SagaStatus.RUNNING, b"{}"))
        saved = await storage.save(dataclasses.replace(created, state=b"1"))
        await storage.save(dataclasses.replace(saved, state=b"2"))
        await asyncio.sleep(0.01)  # asyncpg calls query loggers soon after, not during, the query
        assert queries == ["INSERT", "WITH", "WITH"]


async def _log_queries(storage: SqlAlchemySagaStorage) -> list[str]:
    """The first word of every statement the storage's only connection runs from now on."""
    async with storage._db.connect():  # opens it if the storage has not yet
        pass
    (session,) = storage._db._idle
    queries: list[str] = []
    session.raw.add_query_logger(lambda q: queries.append(q.query.split()[0].upper()))  # type: ignore[attr-defined]
    return queries


async def test_load_many_is_one_prebuilt_statement(database_url: str, schema: str) -> None:
    """``= ANY($1::uuid[])``: one SQL text for any number of ids, run on the driver directly."""
    from storage import ExecutionRecord, SagaStatus

    await upgrade_async(database_url, schema=schema)
    async with SqlAlchemySagaStorage(database_url, schema=schema, pool_size=1) as storage:
        ids = [
            (await storage.create(ExecutionRecord(uuid.uuid4(), "order", 1, SagaStatus.RUNNING, b"{}"))).id
            for _ in range(3)
        ]
        assert len(await storage.load_many(ids[:1])) == 1  # prepares it
        queries = await _log_queries(storage)
        found = await storage.load_many([*ids, uuid.uuid4()])
        await asyncio.sleep(0.01)
        assert [r.id for r in found] == ids
        assert queries == ["SELECT"]
        assert storage._db._plans.get(storage._s.load_many) is not None


async def _warm_up(storage: SqlAlchemySagaStorage) -> None:
    """Run each one-statement write once on a throwaway execution, its outbox rows then marked sent.

    asyncpg looks the array types up on their first use (a ``SELECT`` the query logger would see).
    """
    from storage import ExecutionRecord, OutboxMessage, ReplyRecord, SagaStatus
    from storage.records import OutboxClaim

    outbox = [OutboxMessage("warm", None, b"v")]
    first, second = OutboxClaim("warm", 30), OutboxClaim("warm", 30)
    warm = ExecutionRecord(uuid.uuid4(), "warm", 1, SagaStatus.RUNNING, b"{}")
    created = await storage.create(warm, outbox=outbox, outbox_claim=first)
    reply = ReplyRecord(warm.id, uuid.uuid4(), 200, "applied")
    await storage.save(created, outbox=outbox, reply=reply, outbox_claim=second)
    await storage.mark_outbox_sent(first.ids + second.ids)


async def _rows(database_url: str, schema: str, sql: str) -> list[Any]:
    conn = await _connect(database_url, schema)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def test_writes_with_outbox_and_reply_are_one_statement(database_url: str, schema: str) -> None:
    """A remote step's save (state + applied reply + claimed outbox rows) and a create with outbox rows are
    one statement each, the outbox ids come back in the rows' order, and every part has the same clock."""
    from storage import ExecutionRecord, OutboxMessage, ReplyRecord, SagaStatus
    from storage.records import OutboxClaim

    await upgrade_async(database_url, schema=schema)
    messages = [OutboxMessage(f"t{n}", None if n % 2 else b"k%d" % n, b"v%d" % n, {"n": n}) for n in range(5)]
    async with SqlAlchemySagaStorage(database_url, schema=schema, pool_size=1) as storage:
        await _warm_up(storage)
        queries = await _log_queries(storage)
        first = OutboxClaim("me", 30)
        created = await storage.create(
            ExecutionRecord(uuid.uuid4(), "order", 1, SagaStatus.RUNNING, b"{}"),
            outbox=messages[:2],
            outbox_claim=first,
        )
        second = OutboxClaim("me", 30)
        request_id = uuid.uuid4()
        saved = await storage.save(
            dataclasses.replace(created, status=SagaStatus.PAUSED, state=b"1"),
            outbox=messages[2:],
            reply=ReplyRecord(created.id, request_id, 200, "applied"),
            outbox_claim=second,
        )
        unclaimed = await storage.save(dataclasses.replace(saved, state=b"2"), outbox=messages[:1])
        replied = await storage.save(
            dataclasses.replace(unclaimed, state=b"3"),
            reply=ReplyRecord(created.id, uuid.uuid4(), 200, "applied"),
        )
        await asyncio.sleep(0.01)
        assert queries == ["WITH"] * 4
        assert replied.version == 4

    rows = await _rows(
        database_url,
        schema,
        "SELECT id, topic, key, value, headers, created_at, claimed_by, claimed_until FROM saga_outbox"
        " WHERE sent_at IS NULL ORDER BY id",
    )
    assert [r["id"] for r in rows[:2]] == first.ids
    assert [r["id"] for r in rows[2:5]] == second.ids
    assert first.ids[0] < first.ids[1] < second.ids[0] < second.ids[1] < second.ids[2]
    assert [(r["topic"], r["key"], r["value"], r["headers"]) for r in rows] == [
        (m.topic, m.key, m.value, f'{{"n": {m.headers["n"]}}}') for m in (*messages, messages[0])
    ]
    assert {r["claimed_by"] for r in rows[:5]} == {"me"} and rows[5]["claimed_by"] is None
    assert rows[5]["claimed_until"] is None
    assert rows[2]["claimed_until"] == saved.updated_at + timedelta(seconds=30)
    # one statement, one clock: the rows and the reply carry the execution's updated_at
    assert {r["created_at"] for r in rows[:2]} == {created.updated_at}
    assert {r["created_at"] for r in rows[2:5]} == {saved.updated_at}
    replies = await _rows(
        database_url,
        schema,
        f"SELECT request_id, received_at FROM saga_replies WHERE execution_id = '{created.id}' ORDER BY id",
    )
    assert (replies[0]["request_id"], replies[0]["received_at"]) == (request_id, saved.updated_at)


async def test_a_failed_one_statement_save_writes_nothing(database_url: str, schema: str) -> None:
    """Stale version, unknown id, duplicate applied reply: no reply row, no outbox row, no state change."""
    from storage import (
        ConcurrencyError,
        DuplicateReplyError,
        ExecutionNotFoundError,
        ExecutionRecord,
        OutboxMessage,
        ReplyRecord,
        SagaStatus,
    )
    from storage.records import OutboxClaim

    await upgrade_async(database_url, schema=schema)
    async with SqlAlchemySagaStorage(database_url, schema=schema, pool_size=1) as storage:
        created = await storage.create(ExecutionRecord(uuid.uuid4(), "order", 1, SagaStatus.RUNNING, b"{}"))
        applied = ReplyRecord(created.id, uuid.uuid4(), 200, "applied")
        current = await storage.save(dataclasses.replace(created, state=b"1"), reply=applied)
        await _warm_up(storage)
        queries = await _log_queries(storage)
        claim = OutboxClaim("me", 30)
        outbox = [OutboxMessage("t", None, b"v")]

        with pytest.raises(ConcurrencyError):  # stale version
            await storage.save(
                dataclasses.replace(created, state=b"lost"),
                outbox=outbox,
                reply=ReplyRecord(created.id, uuid.uuid4(), 200, "applied"),
                outbox_claim=claim,
            )
        await asyncio.sleep(0.01)
        assert queries == ["WITH", "SELECT"]  # the write, then "not found or stale?"
        with pytest.raises(ExecutionNotFoundError):
            await storage.save(
                dataclasses.replace(created, id=uuid.uuid4()),
                outbox=outbox,
                reply=ReplyRecord(created.id, uuid.uuid4(), 200, "applied"),
            )
        with pytest.raises(DuplicateReplyError):  # right version, but the reply was applied already
            await storage.save(
                dataclasses.replace(current, state=b"twice"), outbox=outbox, reply=applied, outbox_claim=claim
            )
        assert claim.ids == []
        assert await storage.load(created.id) == current
        assert len(await storage.list_replies(created.id)) == 1
        # the connection is still good after the aborted statement
        assert (await storage.save(current, outbox=outbox)).version == current.version + 1
    assert len(await _rows(database_url, schema, "SELECT id FROM saga_outbox WHERE sent_at IS NULL")) == 1
    assert (
        len(
            await _rows(
                database_url, schema, f"SELECT id FROM saga_replies WHERE execution_id = '{created.id}'"
            )
        )
        == 1
    )


# -- commits that do not wait for the WAL flush -------------------------------------------------------


async def _wal_syncs(raw: Any) -> int:
    """The server's WAL fsync count, with this connection's own pending counts flushed into it first."""
    await raw.execute("SELECT pg_stat_force_next_flush()")  # counts are reported when the backend idles
    await raw.execute("SELECT 1")
    return int(await raw.fetchval("SELECT wal_sync FROM pg_stat_wal"))


async def test_claims_renewals_releases_and_sent_marks_do_not_wait_for_fsync(
    database_url: str, schema: str
) -> None:
    """Each of these writes commits without flushing the WAL; a save after them still flushes it.

    Counted with ``pg_stat_wal.wal_sync``, which the whole server shares: another session's fsyncs only
    add to the count, so each measurement of a write that should not flush is taken three times and the
    smallest count kept.
    """
    from storage import ExecutionRecord, OutboxMessage, SagaStatus
    from storage.records import OutboxClaim

    n = 40
    await upgrade_async(database_url, schema=schema)
    async with SqlAlchemySagaStorage(database_url, schema=schema, pool_size=1) as storage:
        claim = OutboxClaim("me", 600)
        records = []
        for _ in range(n):
            record = ExecutionRecord(uuid.uuid4(), "order", 1, SagaStatus.PAUSED, b"{}")
            messages = [OutboxMessage("t", None, b"v")] * 3
            records.append(await storage.create(record, outbox=messages, outbox_claim=claim))
        (session,) = storage._db._idle
        if await session.raw.fetchval("SHOW fsync") != "on":
            pytest.skip("the server runs with fsync off: there is no flush to count")
        unmarked = list(claim.ids)

        async def syncs(call: Any) -> int:
            before = await _wal_syncs(session.raw)
            await call()
            return await _wal_syncs(session.raw) - before

        async def few_syncs(call: Any) -> int:
            return min([await syncs(call) for _ in range(3)])

        async def claim_all() -> None:  # the same owner again: each call writes (version bump)
            for r in records:
                got = await storage.claim(r.id, "me", lease_seconds=60)
                assert got is not None and got.owner == "me"

        async def renew_all() -> None:
            for r in records:
                assert await storage.renew_claim(r.id, "me", lease_seconds=120)

        async def claim_and_release_all() -> None:
            for r in records:
                assert await storage.claim(r.id, "me", lease_seconds=60) is not None
                await storage.release_claim(r.id, "me")
                assert (await storage.load(r.id)).owner is None

        async def mark_some() -> None:  # n rows a round, each in a call of its own
            for _ in range(n):
                await storage.mark_outbox_sent([unmarked.pop()])

        async def save_all() -> None:
            for r in records:
                current = await storage.load(r.id)
                await storage.save(dataclasses.replace(current, state=b"1"))

        assert await few_syncs(claim_all) < n // 4
        assert await few_syncs(renew_all) < n // 4
        assert await few_syncs(claim_and_release_all) < n // 4
        assert await few_syncs(mark_some) < n // 4
        assert unmarked == []
        # and the setting ended with each statement's transaction: saves on the same connection flush
        assert await syncs(save_all) >= n // 2
        assert await session.raw.fetchval("SHOW synchronous_commit") == "on"
    rows = await _rows(
        database_url, schema, "SELECT count(*) AS unsent FROM saga_outbox WHERE sent_at IS NULL"
    )
    assert rows[0]["unsent"] == 0


async def test_commit_without_flush_is_set_by_the_statement_in_every_plan(
    database_url: str, schema: str
) -> None:
    """The InitPlan really runs: inside a transaction each statement leaves ``synchronous_commit`` off, with
    a custom and with a generic plan, whether or not it matched a row, and still returns the right rows;
    ``save`` leaves it on."""
    await upgrade_async(database_url, schema=schema)
    await _insert_stale(database_url, schema, 1)
    storage = SqlAlchemySagaStorage(database_url, schema=schema, auto_migrate=False)
    plans = Plans(storage.engine.dialect)
    conn = await _connect(database_url, schema)
    s = storage._s

    async def run(statement: Any, params: dict[str, Any], setting: str) -> str:
        """Run ``statement`` in a transaction rolled back afterwards; its status (``UPDATE <rows>``)."""
        plan = plans.get(statement)
        assert plan is not None
        transaction = conn.transaction()
        await transaction.start()
        try:
            status = str(await conn.execute(plan.sql, *plan.args(params)))
            assert await conn.fetchval("SHOW synchronous_commit") == setting, plan.sql
        finally:
            await transaction.rollback()
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        return status

    try:
        saga_id = await conn.fetchval("SELECT id FROM saga_executions")
        row_id = await conn.fetchval(
            "INSERT INTO saga_outbox (execution_id, topic, value, headers, created_at)"
            " VALUES ($1, 't', 'v', '{}', now()) RETURNING id",
            saga_id,
        )
        params = {"p_id": saga_id, "p_owner": "me", "p_lease": timedelta(seconds=30)}
        for mode in ("force_custom_plan", "force_generic_plan"):
            await conn.execute(f"SET plan_cache_mode = {mode}")
            for holder, matched in (("me", "UPDATE 1"), ("other", "UPDATE 0")):
                await conn.execute(
                    "UPDATE saga_executions SET owner = $1, lease_until = now() + interval '1 hour'", holder
                )
                for statement in (s.claim, s.renew, s.release):
                    assert await run(statement, params, "off") == matched
            assert await run(s.mark_sent, {"p_ids": [row_id]}, "off") == "UPDATE 1"
            assert await run(s.mark_sent, {"p_ids": [row_id + 1]}, "off") == "UPDATE 0"
            saved = await run(s.save, {"p_id": saga_id, "p_version": 1, **_save_values()}, "on")
            assert saved == "UPDATE 1"
    finally:
        await conn.close()
        await storage.stop()


def _save_values() -> dict[str, Any]:
    return {
        "p_status": "running",
        "p_state": b"{}",
        "p_steps": [],
        "p_recovery_attempts": 0,
        "p_user": None,
        "p_reply_deadline": None,
        "p_error": None,
        "p_owner": None,
        "p_lease_until": None,
        "p_awaiting_request": None,
    }


# -- migrations ----------------------------------------------------------------------------------------


async def test_upgrade_from_revision_1_keeps_rows_and_adds_recovery_attempts(
    database_url: str, schema: str
) -> None:
    await upgrade_async(database_url, "0001_initial", schema=schema)
    saga_id = uuid.uuid4()
    conn = await _connect(database_url, schema)
    try:
        columns = {
            r["column_name"]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = $1"
                " AND table_name = 'saga_executions'",
                schema,
            )
        }
        assert "recovery_attempts" not in columns
        await conn.execute(
            "INSERT INTO saga_executions (id, name, definition_version, status, state, steps, version,"
            " created_at, updated_at) VALUES ($1, 'order', 1, 'running', '\\x7b7d'::bytea, '[]'::jsonb, 3,"
            " now() - interval '1 hour', now() - interval '1 hour')",
            saga_id,
        )
    finally:
        await conn.close()

    async with SqlAlchemySagaStorage(database_url, schema=schema) as storage:  # auto_migrate: to head
        record = await storage.load(saga_id)
        assert record.recovery_attempts == 0
        assert record.version == 3
        assert await storage.get_sagas_for_recovery(10, stale_after_seconds=60) == [saga_id]
        await storage.increment_recovery_attempts(saga_id)
        assert await storage.get_sagas_for_recovery(10, max_recovery_attempts=1) == []

    conn = await _connect(database_url, schema)
    try:
        assert await conn.fetchval("SELECT version_num FROM saga_alembic_version") == "0004_fencing"
        indexes = {
            r["indexname"]: r["indexdef"]
            for r in await conn.fetch(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1", schema
            )
        }
    finally:
        await conn.close()
    assert indexes["ix_saga_executions_recoverable"].endswith(
        "(updated_at, id) INCLUDE (status, recovery_attempts, reply_deadline)"
        " WHERE ((status)::text = ANY ((ARRAY['compensating'::character varying, 'failed'::character varying,"
        " 'paused'::character varying, 'running'::character varying])::text[]))"
    )
    for gone in ("status_updated", "recovery", "paused_deadline"):
        assert f"ix_saga_executions_{gone}" not in indexes


async def test_migrated_schema_matches_the_metadata(database_url: str, schema: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from storage.sql import metadata

    await upgrade_async(database_url, schema=schema)

    def compare(sync: Any) -> Any:
        context = MigrationContext.configure(sync, opts={"version_table": "saga_alembic_version"})
        return compare_metadata(context, metadata)

    storage = SqlAlchemySagaStorage(database_url, schema=schema, auto_migrate=False)
    try:
        async with storage.engine.connect() as conn:
            diff = await conn.run_sync(compare)
    finally:
        await storage.stop()
    assert diff == []


# -- query plans ---------------------------------------------------------------------------------------

EXPLAIN_ROWS = 100_000


async def _fill_for_explain(database_url: str, schema: str) -> None:
    """100k executions shaped like a live system: almost all finished, a few in flight."""
    conn = await _connect(database_url, schema)
    try:
        await conn.execute(
            f"""
            INSERT INTO saga_executions (id, name, definition_version, status, state, steps, version,
                recovery_attempts, reply_deadline, created_at, updated_at)
            SELECT gen_random_uuid(),
                   (ARRAY['order', 'refund', 'shipping'])[1 + i % 3],
                   1,
                   CASE WHEN i % 100 = 0 THEN 'running'
                        WHEN i % 100 = 1 THEN 'paused'
                        WHEN i % 250 = 2 THEN 'failed'
                        WHEN i % 500 = 3 THEN 'compensating'
                        WHEN i % 100 < 5 THEN 'errored'
                        ELSE 'finished' END,
                   '\\x7b7d'::bytea, '[]'::jsonb, 4, i % 7,
                   CASE WHEN i % 100 = 1 THEN now() + (i % 200 - 100) * interval '1 minute' END,
                   now() - (i * interval '1 second') - interval '1 day',
                   now() - (i * interval '1 second')
            FROM generate_series(1, {EXPLAIN_ROWS}) AS i
            """
        )
        await conn.execute("ANALYZE saga_executions")
    finally:
        await conn.close()


async def test_recovery_query_uses_indexes(database_url: str, schema: str) -> None:
    await upgrade_async(database_url, schema=schema)
    await _fill_for_explain(database_url, schema)
    storage = SqlAlchemySagaStorage(database_url, schema=schema, auto_migrate=False)
    report: list[str] = []
    try:
        variants: list[dict[str, Any]] = [
            {"stale_after_seconds": None, "saga_name": None},
            {"stale_after_seconds": 300, "saga_name": None},
            {"stale_after_seconds": 300, "saga_name": "order"},
        ]
        plans = Plans(storage.engine.dialect)
        conn = await _connect(database_url, schema)
        try:
            for variant in variants:
                flt, params = recovery_params(storage._s.clock, limit=100, max_recovery_attempts=5, **variant)
                params.update(p_owner="explain", p_lease=timedelta(seconds=30))
                for statement in (storage._s.recovery_ids(flt), storage._s.recovery_claim(flt)):
                    plan = plans.get(statement)
                    assert plan is not None
                    args = plan.args(params)
                    for mode in ("force_custom_plan", "force_generic_plan"):
                        await conn.execute(f"SET plan_cache_mode = {mode}")
                        # EXPLAIN ANALYZE of the claim really claims: roll it back.
                        transaction = conn.transaction()
                        await transaction.start()
                        try:
                            rows = await conn.fetch(f"EXPLAIN (ANALYZE, COSTS OFF) {plan.sql}", *args)
                        finally:
                            await transaction.rollback()
                        text = "\n".join(r[0] for r in rows)
                        report.append(f"-- {variant} {mode}\n{plan.sql}\n{text}")
                        assert "Seq Scan on saga_executions" not in text, text
                        # read in (updated_at, id) order from the partial index: no bitmap, no sort
                        # (the claim then finds its picked ids by primary key, a bitmap scan or not)
                        assert "ix_saga_executions_recoverable" in text, text
                        bitmaps = set(re.findall(r"Bitmap Index Scan on (\w+)", text))
                        assert bitmaps <= {"saga_executions_pkey"}, text
                        assert "Sort" not in text, text
        finally:
            await conn.close()

        # Latency of the recovery query through the storage, as a recovery worker runs it.
        await storage.start()
        for variant in variants:
            timings = []
            for _ in range(200):
                started = time.perf_counter()
                ids = await storage.get_sagas_for_recovery(100, **variant)
                timings.append(time.perf_counter() - started)
            assert ids
            timings.sort()
            report.append(
                f"-- latency {variant}: median {statistics.median(timings) * 1e3:.2f} ms,"
                f" p95 {timings[int(len(timings) * 0.95)] * 1e3:.2f} ms, {len(ids)} ids"
            )
    finally:
        await storage.stop()
    print("\n\n".join(report))


# -- failures ------------------------------------------------------------------------------------------


async def test_dropped_connection_is_unavailable_then_replaced(database_url: str, schema: str) -> None:
    from storage import ExecutionRecord, SagaStatus, StorageUnavailableError

    await upgrade_async(database_url, schema=schema)
    async with SqlAlchemySagaStorage(database_url, schema=schema, pool_size=1) as storage:
        created = await storage.create(ExecutionRecord(uuid.uuid4(), "order", 1, SagaStatus.RUNNING, b"{}"))
        (session,) = storage._db._idle  # the storage's one connection
        pid = session.raw.get_server_pid()  # type: ignore[attr-defined]
        conn = await _connect(database_url)
        try:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()
        await asyncio.sleep(0.2)
        with pytest.raises(StorageUnavailableError) as info:
            await storage.load(created.id)
        assert info.value.retriable
        assert info.value.__cause__ is not None
        assert "load" in str(info.value)
        # the dead connection was dropped: the next call opens a new one
        assert (await storage.load(created.id)).id == created.id
