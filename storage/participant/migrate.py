"""Bring a participant database's store tables up to date with their own Alembic branch.

The branch has its own version table (``saga_participant_alembic_version``), so a participant's database
needs none of the orchestrator's tables and the orchestrator's history never waits on the participant's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = ["PARTICIPANT_MIGRATIONS_DIR", "participant_alembic_config", "upgrade_participant_store"]

#: Where the participant store's migration scripts live inside the installed package.
PARTICIPANT_MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def participant_alembic_config() -> Config:
    """An Alembic `Config` for the participant store's migrations, without any ini file."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(PARTICIPANT_MIGRATIONS_DIR))
    return config


def _upgrade(connection: Connection, revision: str) -> None:
    from alembic import command

    config = participant_alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def upgrade_participant_store(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the participant store's tables on ``engine``'s database in one transaction."""
    from storage.sql.connections import ErrorTranslator

    shown = engine.url.render_as_string(hide_password=True)
    with ErrorTranslator(shown, f"participant store upgrade to {revision}"):
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade, revision)
