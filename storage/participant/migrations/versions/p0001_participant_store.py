"""The participant store: commands (claims and stored replies), saga steps (tombstones) and the reply outbox.

Revision ID: p0001_participant_store
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "p0001_participant_store"
down_revision: str | None = None
branch_labels: tuple[str, ...] | None = ("participant",)
depends_on: str | None = None

_Serial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "saga_participant_commands",
        sa.Column("service", sa.String(200), primary_key=True),
        sa.Column("idempotency_key", sa.String(200), primary_key=True),
        sa.Column("execution_id", sa.String(64), nullable=True),
        sa.Column("step", sa.String(200), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(100), nullable=True),
        sa.Column("lease_until", sa.Float, nullable=True),
        sa.Column("reply_status", sa.Integer, nullable=True),
        sa.Column("reply_value", sa.LargeBinary, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "saga_participant_steps",
        sa.Column("service", sa.String(200), primary_key=True),
        sa.Column("execution_id", sa.String(64), primary_key=True),
        sa.Column("step", sa.String(200), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "saga_participant_outbox",
        sa.Column("id", _Serial, primary_key=True, autoincrement=True),
        sa.Column("service", sa.String(200), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("headers", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index(
        "ix_saga_participant_outbox_created", "saga_participant_outbox", ["service", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_saga_participant_outbox_created", table_name="saga_participant_outbox")
    op.drop_table("saga_participant_outbox")
    op.drop_table("saga_participant_steps")
    op.drop_table("saga_participant_commands")
