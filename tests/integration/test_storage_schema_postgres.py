"""``storage.schema`` names a PostgreSQL schema that need not exist yet: migrating creates it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from saga.cli import main
from storage import ExecutionRecord, SagaStatus
from storage.sql import SqlAlchemySagaStorage

pytestmark = [pytest.mark.postgres]


async def _admin(database_url: str, sql: str) -> list[object]:
    import asyncpg  # type: ignore[import-untyped]
    from sqlalchemy.engine import make_url

    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


async def test_auto_migrate_creates_the_schema(database_url: str) -> None:
    schema = f"saga_new_{uuid.uuid4().hex[:10]}"
    try:
        async with SqlAlchemySagaStorage(database_url, schema=schema) as storage:
            record = ExecutionRecord(
                id=uuid.uuid4(), name="s", definition_version=1, status=SagaStatus.RUNNING, state=b"{}"
            )
            await storage.create(record)
            assert (await storage.load(record.id)).name == "s"
        tables = await _admin(database_url, f"SELECT count(*) FROM pg_tables WHERE schemaname = '{schema}'")
        assert tables[0][0] >= 1  # type: ignore[index]
    finally:
        await _admin(database_url, f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def test_db_upgrade_creates_the_schema(database_url: str, tmp_path: Path) -> None:
    import asyncio

    schema = f"saga_new_{uuid.uuid4().hex[:10]}"
    config = tmp_path / "s.yml"
    config.write_text(f"storage:\n  url: {database_url}\n  schema: {schema}\n")
    try:
        assert main(["db", "upgrade", "--config", str(config)]) == 0
        assert main(["stats", "--config", str(config)]) == 0
    finally:
        asyncio.run(_admin(database_url, f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
