"""What recovery reports: the outcome of one execution, of one worker pass, and the worker's counters.

Plain data, kept apart from the code: `recover_saga`'s bookkeeping and the worker's loop both build and
read these, and neither should have to import the other to do so.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from saga.execution import SagaExecution
from storage import SagaStatus

__all__ = ["RecoveryOutcome", "RecoveryReport", "RecoveryResult", "RecoveryStats"]

#: What became of one claimed execution.
#:
#: ``recovered``: the manager resumed it (it may now be PAUSED, FINISHED, ERRORED...);
#: ``failed``: recovery raised, one attempt was counted and the execution is FAILED;
#: ``dead_lettered``: that failure used the last attempt, the execution is DEAD_LETTER;
#: ``busy``: another worker holds it or moved it on meanwhile, nothing counted;
#: ``outage``: the database was unreachable, nothing counted;
#: ``released``: claimed but not started because the worker was stopping, or because its definition
#: version is not registered in this process (claim released, nothing counted).
RecoveryOutcome = Literal["recovered", "failed", "dead_lettered", "busy", "outage", "released"]


@dataclass(frozen=True, slots=True)
class RecoveryResult:
    """The outcome of recovering one execution.

    Attributes:
        execution_id: The execution.
        outcome: See `RecoveryOutcome`.
        status: Its status afterwards, when known.
        attempts: Its recovery attempts after a counted failure.
        error: ``type`` and ``message`` of the exception that made the recovery fail.
        execution: The execution as the manager left it (``recovered`` only).
        exception: The exception itself (``failed``, ``dead_lettered``, ``outage``).
    """

    execution_id: uuid.UUID
    outcome: RecoveryOutcome
    status: SagaStatus | None = None
    attempts: int | None = None
    error: Mapping[str, str] | None = None
    execution: SagaExecution | None = field(default=None, repr=False, compare=False)
    exception: BaseException | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What one `SagaRecoveryWorker.run_once` pass did.

    Attributes:
        claimed: Executions claimed by this pass.
        results: One result per claimed execution, in completion order.
        duration: Seconds the pass took.
        outage: The database error that cut the pass short, if one did.
    """

    claimed: int
    results: tuple[RecoveryResult, ...] = ()
    duration: float = 0.0
    outage: BaseException | None = field(default=None, repr=False, compare=False)

    def ids(self, outcome: RecoveryOutcome) -> list[uuid.UUID]:
        """Ids of the executions with this outcome."""
        return [r.execution_id for r in self.results if r.outcome == outcome]

    @property
    def recovered(self) -> list[uuid.UUID]:
        """Ids resumed by the manager."""
        return self.ids("recovered")

    @property
    def failed(self) -> list[uuid.UUID]:
        """Ids whose recovery failed (attempt counted, now FAILED)."""
        return self.ids("failed")

    @property
    def dead_lettered(self) -> list[uuid.UUID]:
        """Ids moved to DEAD_LETTER by this pass."""
        return self.ids("dead_lettered")

    @property
    def busy(self) -> list[uuid.UUID]:
        """Ids another worker was advancing."""
        return self.ids("busy")


@dataclass(slots=True)
class RecoveryStats:
    """Counters of a `SagaRecoveryWorker` since it was built.

    Attributes:
        batches: Claim passes that reached the database.
        claimed: Executions claimed.
        recovered: Resumed by the manager.
        failed: Recoveries that raised (attempt counted), dead-lettered ones included.
        dead_lettered: Executions moved to DEAD_LETTER.
        busy: Skipped because another worker held them.
        released: Claimed but released unstarted at shutdown.
        outages: Database outages ridden out (one per outage, however many retries it took).
        errors: Unexpected errors of the loop itself (logged, then the loop carried on).
    """

    batches: int = 0
    claimed: int = 0
    recovered: int = 0
    failed: int = 0
    dead_lettered: int = 0
    busy: int = 0
    released: int = 0
    outages: int = 0
    errors: int = 0
