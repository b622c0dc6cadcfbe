"""The participant store: a participant's claims, stored replies, step tombstones and reply outbox.

Its tables live in the participant's own database so a handler's writes commit with its dedup record and
its reply. Imported on demand (``storage.participant``), so the orchestrator does not load it.
"""

from storage.participant.migrate import participant_alembic_config, upgrade_participant_store
from storage.participant.store import (
    ClaimResult,
    CommandKind,
    OutboxRow,
    SqlParticipantStore,
    StepState,
    StoreTransaction,
)

__all__ = [
    "ClaimResult",
    "CommandKind",
    "OutboxRow",
    "SqlParticipantStore",
    "StepState",
    "StoreTransaction",
    "participant_alembic_config",
    "upgrade_participant_store",
]
