"""Track recovery attempts per execution and index the recovery query by them.

Existing rows start at 0 attempts, i.e. every stalled execution gets the full number of recoveries.

Revision ID: 0002_recovery_attempts
Revises: 0001_initial
Create Date: 2024-07-01
"""

from __future__ import annotations

from alembic import op

revision: str = "0002_recovery_attempts"
down_revision: str | None = "0001_initial"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # A plain ADD COLUMN (no batch copy on SQLite): NOT NULL with a constant default is valid on both.
    op.execute("ALTER TABLE saga_executions ADD COLUMN recovery_attempts INTEGER NOT NULL DEFAULT 0")
    op.drop_index("ix_saga_executions_status_updated", table_name="saga_executions")
    op.create_index(
        "ix_saga_executions_recovery", "saga_executions", ["status", "recovery_attempts", "updated_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_saga_executions_recovery", table_name="saga_executions")
    op.create_index("ix_saga_executions_status_updated", "saga_executions", ["status", "updated_at"])
    with op.batch_alter_table("saga_executions") as batch:
        batch.drop_column("recovery_attempts")
