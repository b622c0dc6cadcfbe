"""Fence outbox commands by the request their execution awaits; isolate rows the broker refuses.

``saga_executions.awaiting_request`` is the request id a paused execution waits for; an outbox row carries
its command's ``request_id`` and is published only while the two match. A save that moves an execution past
a request cancels that request's unsent rows, found through ``ix_saga_outbox_unsent_execution`` (partial on
``sent_at IS NULL``, so it only holds rows in flight). ``attempts`` counts transient publish failures of a
row (its own backoff grows with it); ``outcome`` and ``error`` record a row cancelled or refused for good.

Revision ID: 0004_fencing
Revises: 0003_recoverable_index
Create Date: 2024-09-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004_fencing"
down_revision: str | None = "0003_recoverable_index"
branch_labels: str | None = None
depends_on: str | None = None

_json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("saga_executions", sa.Column("awaiting_request", sa.Uuid(), nullable=True))
    op.add_column("saga_outbox", sa.Column("request_id", sa.Uuid(), nullable=True))
    op.add_column("saga_outbox", sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("saga_outbox", sa.Column("outcome", sa.String(20), nullable=True))
    op.add_column("saga_outbox", sa.Column("error", _json, nullable=True))
    op.create_index(
        "ix_saga_outbox_unsent_execution",
        "saga_outbox",
        ["execution_id"],
        postgresql_where=sa.text("sent_at IS NULL"),
        sqlite_where=sa.text("sent_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_saga_outbox_unsent_execution", table_name="saga_outbox")
    with op.batch_alter_table("saga_outbox") as batch:
        batch.drop_column("error")
        batch.drop_column("outcome")
        batch.drop_column("attempts")
        batch.drop_column("request_id")
    with op.batch_alter_table("saga_executions") as batch:
        batch.drop_column("awaiting_request")
