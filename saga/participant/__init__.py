"""The participant SDK: `SagaParticipant` executes a service's saga commands and replies to the orchestrator.

``saga.participant.core`` consumes and replies; ``saga.participant.claims`` is the store-backed
(exactly-once) path; ``saga.participant.relay`` publishes committed replies left unpublished.
"""

from saga.participant.core import H_DEAD_LETTER_REASON, H_DEAD_LETTER_TOPIC, SagaParticipant
from saga.participant.types import (
    CommandContext,
    CommandHandler,
    DecisionHandler,
    HandlerTransaction,
    ParticipantStats,
)

__all__ = [
    "H_DEAD_LETTER_REASON",
    "H_DEAD_LETTER_TOPIC",
    "CommandContext",
    "CommandHandler",
    "DecisionHandler",
    "HandlerTransaction",
    "ParticipantStats",
    "SagaParticipant",
]
