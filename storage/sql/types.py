"""Portable column types, so one set of Core statements runs on PostgreSQL (asyncpg) and SQLite (aiosqlite).

* `UtcDateTime`: ``TIMESTAMP WITH TIME ZONE`` on PostgreSQL. SQLite has no such type and SQLAlchemy's
  ``DATETIME`` there silently drops the offset, so values are normalised to UTC on the way in and marked UTC
  on the way out: callers always get timezone-aware datetimes, and the stored strings compare in time
  order because they share one fixed format.
* `JsonDocument`: ``JSONB`` on PostgreSQL (queryable by an operator), ``JSON`` text on SQLite. Encoding goes
  through orjson, which serialises frozen slotted dataclasses, UUIDs and datetimes natively, instead of the
  engine's configured serializer, so the storage behaves the same on an engine the caller built.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import JSON, DateTime
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from storage._json import dumps

__all__ = ["JsonDocument", "UtcDateTime", "dumps_json"]


def dumps_json(value: object) -> str:
    """Encode ``value`` as JSON text (orjson; dataclasses, UUID and datetime included)."""
    return dumps(value).decode()


def _loads_json(value: object) -> object:
    # asyncpg's codec (registered by SQLAlchemy) has already decoded JSONB; SQLite hands back the text.
    if isinstance(value, str | bytes):
        return orjson.loads(value)
    return value


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that comes back aware (UTC) on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or dialect.name != "sqlite":
            return value
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class JsonDocument(TypeDecorator[Any]):
    """A JSON document (``None`` is SQL ``NULL``), encoded with orjson."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(JSON())

    # The impl's own processors would run the engine's json serializer a second time; these replace them.
    def bind_processor(self, dialect: Dialect) -> Callable[[Any], str | None]:
        def process(value: Any) -> str | None:
            return None if value is None else dumps_json(value)

        return process

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any]:
        return _loads_json
