"""Alembic environment for the participant store's tables.

A branch of its own, with its own version table (``saga_participant_alembic_version``): a participant's
database is the service's database, which holds none of the orchestrator's tables, so its history must not
depend on theirs. `storage.participant.migrate` builds the config in code and passes an open connection.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from storage.participant.schema import PREFIX, metadata

VERSION_TABLE = f"{PREFIX}alembic_version"
#: Any constant works; it only has to be the same for every process migrating the same database.
ADVISORY_LOCK_KEY = 0x5A6A_0002

connection = context.config.attributes.get("connection")
if context.is_offline_mode() or connection is None:
    raise RuntimeError(
        "participant store migrations run through storage.participant.upgrade_participant_store"
    )
if connection.dialect.name == "postgresql":
    # Two instances starting at once must not both create the tables; the lock ends with the transaction.
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
