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

    # Minos's member names, aliases of the ones above (iterating the enum lists each status once).
    Created = "created"
    Running = "running"
    Paused = "paused"
    Finished = "finished"
    Errored = "errored"

    @classmethod
    def from_raw(cls, raw: str | SagaStatus) -> SagaStatus:
        """The status whose value is ``raw`` (Minos's name for ``SagaStatus(raw)``).

        Raises:
            ValueError: ``raw`` is no status's value; the message lists the valid ones.
        """
        if isinstance(raw, cls):
            return raw
        try:
            return cls(raw)
        except ValueError:
            valid = ", ".join(member.value for member in cls)
            raise ValueError(f"{raw!r} is not a saga status; expected one of {valid}") from None

    @property
    def raw(self) -> str:
        """The stored value (Minos's name for ``.value``)."""
        return self.value


#: Statuses the recovery query picks up (``PAUSED`` only once its ``reply_deadline`` has passed).
RECOVERABLE_STATUSES: frozenset[SagaStatus] = frozenset(
    {SagaStatus.RUNNING, SagaStatus.COMPENSATING, SagaStatus.FAILED}
)

#: Statuses an execution never leaves by itself.
TERMINAL_STATUSES: frozenset[SagaStatus] = frozenset(
    {SagaStatus.FINISHED, SagaStatus.ERRORED, SagaStatus.DEAD_LETTER}
)
