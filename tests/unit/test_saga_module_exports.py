"""Public names of the modules split into several files: pinned, sorted, and the same objects as before.

``saga.recovery`` is a package and ``saga.participant`` re-exports from ``saga.participant.types``; services
import from the old paths, so those paths and their ``__all__`` must not move with the code.
"""

from __future__ import annotations

import saga
import saga.participant
import saga.recovery

RECOVERY = [
    "RecoveryOutcome",
    "RecoveryReport",
    "RecoveryResult",
    "RecoveryStats",
    "RecoveryTarget",
    "SagaRecoveryWorker",
    "is_outage",
    "recover_saga",
]

PARTICIPANT = [
    "H_DEAD_LETTER_REASON",
    "H_DEAD_LETTER_TOPIC",
    "CommandContext",
    "CommandHandler",
    "DecisionHandler",
    "HandlerTransaction",
    "ParticipantStats",
    "SagaParticipant",
]


def _isort_key(name: str) -> tuple[int, str]:
    # ruff's RUF022 order: CONSTANTS, then Classes, then functions, each alphabetical.
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_recovery_all_is_pinned_and_sorted() -> None:
    assert saga.recovery.__all__ == RECOVERY
    assert saga.recovery.__all__ == sorted(saga.recovery.__all__, key=_isort_key)


def test_participant_all_is_pinned_and_sorted() -> None:
    assert saga.participant.__all__ == PARTICIPANT
    assert saga.participant.__all__ == sorted(saga.participant.__all__, key=_isort_key)


def test_old_import_paths_resolve_to_the_public_objects() -> None:
    from saga.participant import CommandContext, ParticipantStats, SagaParticipant
    from saga.recovery import RecoveryReport, RecoveryStats, SagaRecoveryWorker, recover_saga

    for name in RECOVERY:
        assert getattr(saga.recovery, name) is not None
    for name in PARTICIPANT:
        assert getattr(saga.participant, name) is not None
    assert (saga.recover_saga, saga.SagaRecoveryWorker) == (recover_saga, SagaRecoveryWorker)
    assert (saga.CommandContext, saga.ParticipantStats, saga.SagaParticipant) == (
        CommandContext,
        ParticipantStats,
        SagaParticipant,
    )
    assert (saga.recovery.RecoveryReport, saga.recovery.RecoveryStats) == (RecoveryReport, RecoveryStats)
