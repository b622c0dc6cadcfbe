"""SqlAlchemySagaStorage on SQLite files (no server needed): migrations, errors, timestamps, lifecycle."""

from __future__ import annotations

import sqlite3
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from storage import (
    ExecutionRecord,
    SagaStatus,
    SqlAlchemySagaStorage,
    StorageError,
    StorageUnavailableError,
)
from storage.migrate import upgrade, upgrade_async


def record(**changes: object) -> ExecutionRecord:
    return ExecutionRecord(uuid.uuid4(), "order", 1, SagaStatus.RUNNING, b"{}", **changes)  # type: ignore[arg-type]


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


async def test_upgrade_from_revision_1_keeps_rows(tmp_path: Path) -> None:
    db = tmp_path / "saga.db"
    await upgrade_async(sqlite_url(db), "0001_initial")
    saga_id = uuid.uuid4()
    with sqlite3.connect(db) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(saga_executions)")}
        assert "recovery_attempts" not in columns
        conn.execute(
            "INSERT INTO saga_executions (id, name, definition_version, status, state, steps, version,"
            " created_at, updated_at) VALUES (?, 'order', 1, 'failed', x'7b7d', '[]', 2,"
            " '2024-01-01 00:00:00.000000', '2024-01-01 00:00:00.000000')",
            (saga_id.hex,),
        )
    async with SqlAlchemySagaStorage(sqlite_url(db)) as storage:  # migrates to head on start
        loaded = await storage.load(saga_id)
        assert loaded.recovery_attempts == 0
        assert loaded.updated_at == datetime(2024, 1, 1, tzinfo=UTC)
        assert await storage.get_sagas_for_recovery(10, stale_after_seconds=60) == [saga_id]
    with sqlite3.connect(db) as conn:
        (version,) = conn.execute("SELECT version_num FROM saga_alembic_version").fetchone()
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(saga_executions)")}
    assert version == "0004_fencing"
    assert "ix_saga_executions_recoverable" in indexes
    assert not indexes & {"ix_saga_executions_recovery", "ix_saga_executions_paused_deadline"}


async def test_recovery_index_covers_the_candidates_the_query_names(tmp_path: Path) -> None:
    """The migration's frozen status list is the one the recovery query repeats (``RECOVERY_CANDIDATES``),
    so SQLite, which matches a partial index's WHERE term by term, can use the index."""
    from storage.sql.schema import RECOVERY_CANDIDATES

    db = tmp_path / "saga.db"
    await upgrade_async(sqlite_url(db))
    with sqlite3.connect(db) as conn:
        (sql,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'ix_saga_executions_recoverable'"
        ).fetchone()
        listed = ", ".join(f"'{s}'" for s in RECOVERY_CANDIDATES)
        assert sql.endswith(f"WHERE status IN ({listed})")
        plan = " ".join(
            str(row[-1])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM saga_executions"
                f" WHERE status IN ({listed}) AND (status != 'paused' OR reply_deadline < '2030-01-01')"
                " AND recovery_attempts < 5 ORDER BY updated_at, id LIMIT 10"
            )
        )
    assert "ix_saga_executions_recoverable" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # no sort: the index gives the order


def test_sync_upgrade_is_idempotent(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "saga.db")
    upgrade(url)
    upgrade(url)


async def test_migrated_schema_matches_the_metadata(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from storage.sql import metadata

    def compare(sync: Any) -> Any:
        context = MigrationContext.configure(sync, opts={"version_table": "saga_alembic_version"})
        return compare_metadata(context, metadata)

    async with (
        SqlAlchemySagaStorage(sqlite_url(tmp_path / "saga.db")) as storage,
        storage.engine.connect() as conn,
    ):
        diff = await conn.run_sync(compare)
    assert diff == []


async def test_in_memory_sqlite(tmp_path: Path) -> None:
    async with SqlAlchemySagaStorage("sqlite+aiosqlite://") as storage:
        created = await storage.create(record())
        assert (await storage.load(created.id)).version == 1


async def test_timestamps_are_utc_aware_whatever_offset_came_in(tmp_path: Path) -> None:
    deadline = datetime(2030, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    async with SqlAlchemySagaStorage(sqlite_url(tmp_path / "saga.db")) as storage:
        created = await storage.create(record(reply_deadline=deadline))
        loaded = await storage.load(created.id)
    assert loaded.reply_deadline == deadline
    assert loaded.reply_deadline is not None and loaded.reply_deadline.utcoffset() == timedelta(0)


async def test_missing_tables_are_a_storage_error_not_unavailable(tmp_path: Path) -> None:
    async with SqlAlchemySagaStorage(sqlite_url(tmp_path / "saga.db"), auto_migrate=False) as storage:
        with pytest.raises(StorageError) as info:
            await storage.load(uuid.uuid4())
    assert not isinstance(info.value, StorageUnavailableError)
    assert not info.value.retriable
    assert "no such table" in str(info.value)


async def test_unreachable_postgres_is_unavailable_and_hides_the_password() -> None:
    storage = SqlAlchemySagaStorage(
        "postgresql+asyncpg://saga:s3cr3t-pw@127.0.0.1:9/saga", auto_migrate=False
    )
    try:
        with pytest.raises(StorageUnavailableError) as info:
            await storage.load(uuid.uuid4())
    finally:
        await storage.stop()
    migrating = SqlAlchemySagaStorage("postgresql+asyncpg://saga:s3cr3t-pw@127.0.0.1:9/saga")
    with pytest.raises(StorageUnavailableError) as on_start:
        await migrating.start()  # the migration on start fails the same way
    await migrating.stop()
    assert "s3cr3t-pw" not in str(on_start.value)
    assert info.value.retriable
    assert info.value.__cause__ is not None
    assert "s3cr3t-pw" not in str(info.value)
    assert "127.0.0.1:9" in str(info.value)
    assert "s3cr3t-pw" not in repr(storage)


async def test_lifecycle_is_idempotent_and_reusable_engine_is_not_disposed(tmp_path: Path) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(sqlite_url(tmp_path / "saga.db"))
    storage = SqlAlchemySagaStorage(engine=engine)
    await storage.start()
    await storage.start()
    await storage.create(record())
    await storage.stop()
    await storage.stop()
    async with engine.connect() as conn:  # still usable: the storage did not own it
        assert (await conn.execute(text("SELECT count(*) FROM saga_executions"))).scalar() == 1
    await engine.dispose()


def test_needs_a_url_or_an_engine() -> None:
    with pytest.raises(ValueError):
        SqlAlchemySagaStorage()
    with pytest.raises(ValueError):
        SqlAlchemySagaStorage("sqlite+aiosqlite://", schema="other")
