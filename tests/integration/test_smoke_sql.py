"""Smoke test: one SQLAlchemy 2 async code path on PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

metadata = sa.MetaData()
smoke = sa.Table(
    f"smoke_{uuid.uuid4().hex[:12]}",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


async def _round_trip(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        row_id = uuid.uuid4()
        created = datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC)
        async with engine.begin() as conn:
            await conn.execute(smoke.insert().values(id=row_id, name="saga", created_at=created))
        async with engine.connect() as conn:
            row = (await conn.execute(sa.select(smoke).where(smoke.c.id == row_id))).one()
        assert row.id == row_id
        assert row.name == "saga"
        # SQLite stores no offset: compare as UTC either way.
        got = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        assert got == created
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.drop_all)
        await engine.dispose()


@pytest.mark.parametrize("backend", [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
async def test_create_insert_select(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if backend == "postgres":
        url = request.getfixturevalue("database_url")
        assert url.startswith("postgresql+asyncpg://"), url
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'smoke.sqlite3'}"
    await _round_trip(url)
