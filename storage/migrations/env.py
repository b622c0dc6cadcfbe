"""Alembic environment for the saga tables.

`storage.migrate` builds the Alembic config in code and passes an open connection in
``config.attributes["connection"]``, so no ``alembic.ini`` is needed at runtime. Run from the command line
(``alembic -x url=...``) it opens its own async engine instead.

The version table is ``saga_alembic_version`` rather than Alembic's default, because these tables usually
live in the application's database next to the application's own Alembic history.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from storage.sql.schema import PREFIX, metadata

VERSION_TABLE = f"{PREFIX}alembic_version"
#: Any constant works; it only has to be the same for every process migrating the same database.
ADVISORY_LOCK_KEY = 0x5A6A_0001


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Two services starting at once must not both create the tables; the lock ends with the transaction.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise RuntimeError("no database URL: pass -x url=... or use storage.migrate.upgrade()")
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


connection = context.config.attributes.get("connection")
if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
if connection is not None:
    _run(connection)
else:
    asyncio.run(_run_online())
