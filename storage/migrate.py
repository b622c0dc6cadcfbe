"""Bring a database's saga tables up to date with the Alembic migrations shipped in this package.

The Alembic configuration is built in code (``script_location`` points into the installed package), so
services need no ``alembic.ini``; `SqlAlchemySagaStorage.start` calls `upgrade_async` when
``auto_migrate`` is on. Works for ``postgresql+asyncpg://`` and ``sqlite+aiosqlite://`` URLs alike.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import CreateSchema

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = ["MIGRATIONS_DIR", "alembic_config", "connect_args", "revisions", "upgrade", "upgrade_async"]

#: Where the migration scripts live inside the installed package.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config() -> Config:
    """An Alembic `Config` for this package's migrations, without any ini file."""
    from alembic.config import Config  # Alembic is only needed when migrating

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def revisions() -> list[str]:
    """The migrations' revision ids, oldest first (for messages about a revision that does not exist)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def connect_args(url: str, schema: str | None) -> dict[str, Any]:
    """Driver arguments that put the tables in ``schema`` (PostgreSQL only) via the ``search_path``."""
    if schema is None:
        return {}
    if make_url(url).get_backend_name() != "postgresql":
        raise ValueError("schema= is only supported on PostgreSQL")
    return {"server_settings": {"search_path": schema}}


def _upgrade(connection: Connection, revision: str) -> None:
    from alembic import command

    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def upgrade_async(
    url: str | None = None,
    revision: str = "head",
    *,
    engine: AsyncEngine | None = None,
    schema: str | None = None,
) -> None:
    """Upgrade the saga tables to ``revision`` in one transaction (PostgreSQL DDL is transactional).

    Args:
        url: SQLAlchemy async URL; ignored when ``engine`` is given.
        revision: Target revision, ``head`` by default.
        engine: Reuse this engine (its pool and settings) instead of opening a throwaway one.
        schema: PostgreSQL schema to create the tables in (through the connection's ``search_path``);
            created first if it does not exist.
    """
    own = engine is None
    if engine is None:
        if url is None:
            raise ValueError("upgrade_async needs a url or an engine")
        engine = create_async_engine(url, poolclass=NullPool, connect_args=connect_args(url, schema))
    from storage.sql.connections import ErrorTranslator  # storage.sql imports this module

    # Driver errors (a refused connection, a missing database) leave as StorageError naming the
    # database with its password hidden, like every other storage call.
    shown = engine.url.render_as_string(hide_password=True)
    try:
        with ErrorTranslator(shown, f"schema upgrade to {revision}"):
            async with engine.begin() as conn:
                if schema is not None:
                    await conn.execute(CreateSchema(schema, if_not_exists=True))
                await conn.run_sync(_upgrade, revision)
    finally:
        if own:
            await engine.dispose()


def upgrade(url: str, revision: str = "head", *, schema: str | None = None) -> None:
    """Blocking `upgrade_async` for scripts and deploy steps; not callable from inside a running loop."""
    asyncio.run(upgrade_async(url, revision, schema=schema))
