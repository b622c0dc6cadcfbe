"""The SQL adapter of the storage port: SQLAlchemy 2 Core on PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from storage.sql.schema import PREFIX, SagaTables, metadata, tables
from storage.sql.storage import SqlAlchemySagaStorage

__all__ = ["PREFIX", "SagaTables", "SqlAlchemySagaStorage", "metadata", "tables"]
