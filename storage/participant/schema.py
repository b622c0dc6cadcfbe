"""The participant store's tables, as SQLAlchemy Core metadata (the shape its latest migration produces).

They live in the participant's own database, next to the tables its handlers write, so the dedup record,
the handler's writes and the reply commit in one transaction:

* ``saga_participant_commands``: one row per handled command (its idempotency key): the claim (owner and
  lease, on the database's clock) while a handler runs, then the stored reply that answers duplicates.
* ``saga_participant_steps``: what happened to one saga step ``(execution, step)`` here: its forward
  command took effect (``forward``), its compensation ran (``compensated``), or its compensation came first
  and left a tombstone (``tombstone``) that refuses the late forward command.
* ``saga_participant_outbox``: replies committed and not yet known to be published; the relay publishes
  and deletes them.

Times are seconds since the epoch as floating point, read from the database's clock, so leases compare on
one clock whatever the participants' clocks say. No foreign keys: nothing on the hot path should pay for them.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text

__all__ = ["PREFIX", "commands", "metadata", "outbox", "steps"]

#: Every table and index of the participant store starts with this.
PREFIX = "saga_participant_"

# BIGINT on PostgreSQL; SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
_Serial = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

commands = Table(
    f"{PREFIX}commands",
    metadata,
    Column("service", String(200), primary_key=True),
    Column("idempotency_key", String(200), primary_key=True),
    Column("execution_id", String(64), nullable=True),
    Column("step", String(200), nullable=True),
    Column("kind", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("owner", String(100), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("reply_status", Integer, nullable=True),
    Column("reply_value", LargeBinary, nullable=True),
    Column("updated_at", Float, nullable=False),
)

steps = Table(
    f"{PREFIX}steps",
    metadata,
    Column("service", String(200), primary_key=True),
    Column("execution_id", String(64), primary_key=True),
    Column("step", String(200), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("updated_at", Float, nullable=False),
)

outbox = Table(
    f"{PREFIX}outbox",
    metadata,
    Column("id", _Serial, primary_key=True, autoincrement=True),
    Column("service", String(200), nullable=False),
    Column("topic", String(255), nullable=False),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=False),
    Column("headers", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index(f"ix_{PREFIX}outbox_created", "service", "created_at"),
)
