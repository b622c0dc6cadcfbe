"""Recovery: resume executions that crashes, lost replies, timeouts or deadlines left stalled.

Two layers, following python-cqrs's names (DESIGN §1):

* `recover_saga` resumes one execution through the manager (``SagaManager.recover``) and keeps the
  books when that fails: one more recovery attempt and status ``FAILED`` (python-cqrs semantics), and
  ``DEAD_LETTER`` with a structured error once the attempts reach the limit, so a person looks at it.
* `SagaRecoveryWorker` is the background loop: it *claims* a batch of recoverable executions with
  ``storage.claim_for_recovery`` (DBOS's "claim, do not just select": concurrent workers never receive the
  same row) and recovers them with bounded concurrency.

Claims and leases. The worker claims under the manager's own ``owner``: ``SagaManager.recover`` claims the
execution again, and a claim by the holder itself succeeds, so the hand-over keeps the row owned all the
way; from then on the manager renews the lease while steps run. Rows claimed but still queued behind the
concurrency limit are the worker's to keep alive: it renews their leases until it hands them over, and on
`SagaRecoveryWorker.stop` it releases those it never started so other workers take them at once.

What is not a failure. `SagaBusyError` (another worker, or another task of this process, is advancing the
execution) is skipped without counting. A database outage (a retriable `StorageError`, or an ``OSError``)
is not counted either: it is not the execution's fault, and counting it would dead-letter healthy sagas
during a long outage. The claim's lease runs out and the execution is retried once the database answers;
the worker backs off meanwhile. Nor is a lost race: a `ConcurrencyError`, or an execution that another
worker holds or has moved on by the time the failure is counted, means someone else moved it on. The
count itself is fenced: a version-checked save of the execution as the worker read it, so a worker that
stalled past its lease never writes FAILED or DEAD_LETTER over another worker's progress, and nothing moves
a terminal execution back. Everything else counts, as in python-cqrs (whose unconditional
``increment_recovery_attempts`` and ``set_recovery_attempts`` stay on the storage for callers).

Modules: `saga.recovery.outcomes` (results, reports, counters), `saga.recovery.recover` (`recover_saga` and
its bookkeeping) and `saga.recovery.worker` (`SagaRecoveryWorker`).
"""

from saga.recovery.outcomes import RecoveryOutcome, RecoveryReport, RecoveryResult, RecoveryStats
from saga.recovery.recover import RecoveryTarget, is_outage, recover_saga
from saga.recovery.worker import SagaRecoveryWorker

__all__ = [
    "RecoveryOutcome",
    "RecoveryReport",
    "RecoveryResult",
    "RecoveryStats",
    "RecoveryTarget",
    "SagaRecoveryWorker",
    "is_outage",
    "recover_saga",
]
