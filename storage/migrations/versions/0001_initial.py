"""Initial saga tables (before recovery attempts were tracked).

Revision ID: 0001_initial
Revises:
Create Date: 2024-06-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# Frozen copies of the types of that time: migrations must not change when storage/sql/schema.py does.
_json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_ts = sa.DateTime(timezone=True)
_serial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "saga_executions",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("definition_version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("steps", _json, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("user_name", sa.String(255), nullable=True),
        sa.Column("reply_deadline", _ts, nullable=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("lease_until", _ts, nullable=True),
        sa.Column("error", _json, nullable=True),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("updated_at", _ts, nullable=False),
    )
    op.create_index("ux_saga_executions_idempotency_key", "saga_executions", ["idempotency_key"], unique=True)
    op.create_index("ix_saga_executions_status_updated", "saga_executions", ["status", "updated_at"])
    op.create_index(
        "ix_saga_executions_paused_deadline",
        "saga_executions",
        ["reply_deadline"],
        postgresql_where=sa.text("status = 'paused'"),
        sqlite_where=sa.text("status = 'paused'"),
    )
    op.create_index("ix_saga_executions_name", "saga_executions", ["name"])
    op.create_index("ix_saga_executions_created_at", "saga_executions", ["created_at"])

    op.create_table(
        "saga_replies",
        sa.Column("id", _serial, primary_key=True, autoincrement=True),
        sa.Column("execution_id", sa.Uuid(), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("received_at", _ts, nullable=False),
    )
    op.create_index("ix_saga_replies_execution", "saga_replies", ["execution_id", "id"])
    op.create_index(
        "ux_saga_replies_applied",
        "saga_replies",
        ["execution_id", "request_id"],
        unique=True,
        postgresql_where=sa.text("outcome = 'applied'"),
        sqlite_where=sa.text("outcome = 'applied'"),
    )

    op.create_table(
        "saga_outbox",
        sa.Column("id", _serial, primary_key=True, autoincrement=True),
        sa.Column("execution_id", sa.Uuid(), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("key", sa.LargeBinary(), nullable=True),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("headers", _json, nullable=False),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("sent_at", _ts, nullable=True),
        sa.Column("claimed_by", sa.String(255), nullable=True),
        sa.Column("claimed_until", _ts, nullable=True),
    )
    op.create_index(
        "ix_saga_outbox_unsent",
        "saga_outbox",
        ["id"],
        postgresql_where=sa.text("sent_at IS NULL"),
        sqlite_where=sa.text("sent_at IS NULL"),
    )

    op.create_table(
        "saga_command_replies",
        sa.Column("idempotency_key", sa.String(255), primary_key=True),
        sa.Column("reply", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _ts, nullable=False),
    )


def downgrade() -> None:
    for table in ("saga_command_replies", "saga_outbox", "saga_replies", "saga_executions"):
        op.drop_table(table)
