"""The tables, as SQLAlchemy Core metadata (the shape Alembic's latest revision produces).

Every query the storage runs on the hot path has an index, and ``saga_executions`` no more than those, since
every index there costs WAL on every ``save`` (``updated_at`` changes each time, so no update is HOT):

* recovery: a partial index on ``(updated_at, id)`` over the rows a recovery may pick up (the recoverable
  statuses and ``PAUSED``), with ``status``, ``recovery_attempts`` and ``reply_deadline`` INCLUDEd, is read
  oldest first and stops after ``limit`` matches. Finished executions, almost all rows of a live system,
  are not in it at all.
* ``name`` and ``created_at`` serve the admin query. ``count_by_status`` (admin and metrics) scans the
  table: no index on ``status`` is worth its upkeep on every save.
* the idempotency key is unique; replies are unique on ``(execution_id, request_id)`` only among
  ``applied`` ones (a partial unique index, valid on PostgreSQL and SQLite), so ignored duplicates can
  still be recorded for the audit trail.
* the outbox relay reads unsent rows through a partial index ``WHERE sent_at IS NULL``, which stays small
  however large the sent history grows; a save that moves an execution past a request finds that
  execution's unsent rows (to cancel them) through a second one on ``execution_id``, as small.
* outbox rows end sent, ``cancelled`` (their execution moved past their request before they went out) or
  ``rejected`` (the broker refuses them for good; ``error`` says why): all three set ``sent_at``, so none
  stays in the unsent indexes.

No foreign keys: replies and outbox rows may outlive or precede the execution they name (an unknown
execution's reply is still recorded), and a foreign key check would cost every hot-path insert.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    text,
)

from storage.sql.types import JsonDocument, UtcDateTime
from storage.status import RECOVERABLE_STATUSES, SagaStatus

__all__ = ["PREFIX", "RECOVERY_CANDIDATES", "SagaTables", "metadata", "tables"]

#: Every table and index this package creates starts with this, to share a database with the application.
PREFIX = "saga_"

# BIGINT on PostgreSQL; SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
_Serial = BigInteger().with_variant(Integer(), "sqlite")

#: Statuses a recovery may pick up: the recoverable ones, and ``PAUSED`` once its reply is overdue. The
#: recovery index covers exactly these rows, and the recovery query repeats this list as literals.
RECOVERY_CANDIDATES: tuple[str, ...] = tuple(
    sorted(s.value for s in {*RECOVERABLE_STATUSES, SagaStatus.PAUSED})
)
_RECOVERY_CANDIDATES_SQL = "status IN ({})".format(", ".join(f"'{s}'" for s in RECOVERY_CANDIDATES))

metadata = MetaData()

executions = Table(
    f"{PREFIX}executions",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("definition_version", Integer, nullable=False),
    Column("status", String(20), nullable=False),
    Column("state", LargeBinary, nullable=False),
    Column("steps", JsonDocument, nullable=False),
    Column("version", Integer, nullable=False),
    Column("recovery_attempts", Integer, nullable=False, server_default=text("0")),
    Column("idempotency_key", String(255), nullable=True),
    # "user" is a reserved word in PostgreSQL (an unquoted `user` means current_user).
    Column("user_name", String(255), key="user", nullable=True),
    Column("reply_deadline", UtcDateTime, nullable=True),
    Column("owner", String(255), nullable=True),
    Column("lease_until", UtcDateTime, nullable=True),
    Column("error", JsonDocument, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("awaiting_request", Uuid(), nullable=True),
    Index(f"ux_{PREFIX}executions_idempotency_key", "idempotency_key", unique=True),
    Index(
        f"ix_{PREFIX}executions_recoverable",
        "updated_at",
        "id",
        postgresql_include=["status", "recovery_attempts", "reply_deadline"],
        postgresql_where=text(_RECOVERY_CANDIDATES_SQL),
        sqlite_where=text(_RECOVERY_CANDIDATES_SQL),
    ),
    Index(f"ix_{PREFIX}executions_name", "name"),
    Index(f"ix_{PREFIX}executions_created_at", "created_at"),
)

replies = Table(
    f"{PREFIX}replies",
    metadata,
    Column("id", _Serial, primary_key=True, autoincrement=True),
    Column("execution_id", Uuid(), nullable=False),
    Column("request_id", Uuid(), nullable=False),
    Column("status", Integer, nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("reason", Text, nullable=True),
    Column("received_at", UtcDateTime, nullable=False),
    Index(f"ix_{PREFIX}replies_execution", "execution_id", "id"),
    Index(
        f"ux_{PREFIX}replies_applied",
        "execution_id",
        "request_id",
        unique=True,
        postgresql_where=text("outcome = 'applied'"),
        sqlite_where=text("outcome = 'applied'"),
    ),
)

outbox = Table(
    f"{PREFIX}outbox",
    metadata,
    Column("id", _Serial, primary_key=True, autoincrement=True),
    Column("execution_id", Uuid(), nullable=False),
    Column("topic", String(255), nullable=False),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=False),
    Column("headers", JsonDocument, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("sent_at", UtcDateTime, nullable=True),
    Column("claimed_by", String(255), nullable=True),
    Column("claimed_until", UtcDateTime, nullable=True),
    Column("request_id", Uuid(), nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("outcome", String(20), nullable=True),
    Column("error", JsonDocument, nullable=True),
    Index(
        f"ix_{PREFIX}outbox_unsent",
        "id",
        postgresql_where=text("sent_at IS NULL"),
        sqlite_where=text("sent_at IS NULL"),
    ),
    Index(
        f"ix_{PREFIX}outbox_unsent_execution",
        "execution_id",
        postgresql_where=text("sent_at IS NULL"),
        sqlite_where=text("sent_at IS NULL"),
    ),
)

command_replies = Table(
    f"{PREFIX}command_replies",
    metadata,
    Column("idempotency_key", String(255), primary_key=True),
    Column("reply", LargeBinary, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)


@dataclass(frozen=True, slots=True)
class SagaTables:
    """The storage's tables, handed around as one value."""

    executions: Table
    replies: Table
    outbox: Table
    command_replies: Table


tables = SagaTables(executions=executions, replies=replies, outbox=outbox, command_replies=command_replies)
