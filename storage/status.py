"""Execution statuses, owned by storage because they are what the rows are queried by."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["RECOVERABLE_STATUSES", "TERMINAL_STATUSES", "SagaStatus"]


class SagaStatus(StrEnum):
    """Where an execution stands.

    ``FAILED`` is recoverable (an exception or a crash left it unfinished); ``DEAD_LETTER`` needs a person
    (compensation failed, or recovery attempts ran out) and only an explicit retry moves it back.
    """

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    COMPENSATING = "compensating"
    FINISHED = "finished"
    ERRORED = "errored"
    FAILED = "failed"
    DEAD_LETTER = "dead_letter"


#: Statuses the recovery query picks up (``PAUSED`` only once its ``reply_deadline`` has passed).
RECOVERABLE_STATUSES: frozenset[SagaStatus] = frozenset(
    {SagaStatus.RUNNING, SagaStatus.COMPENSATING, SagaStatus.FAILED}
)

#: Statuses an execution never leaves by itself.
TERMINAL_STATUSES: frozenset[SagaStatus] = frozenset(
    {SagaStatus.FINISHED, SagaStatus.ERRORED, SagaStatus.DEAD_LETTER}
)
