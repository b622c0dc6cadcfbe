"""Fault: a recovery worker frozen past its lease must not rewrite the saga another worker finished.

Processes: recovery workers A and B (each a `SagaManager` with a `SagaRecoveryWorker`,
``max_recovery_attempts=1``) and the participant, which records every command and decision it receives in
``fault_commands`` (no unique constraint).

The saga is stored as a crashed process leaves it (RUNNING, unclaimed): a slow local step, then a remote
``charge``, then autocommit's commit. A claims it (2 s lease) and is SIGSTOPped inside the slow step; B
claims it once A's lease ran out, runs it to FINISHED (one charge, one commit). A is then SIGCONTed: its
save is refused (`ConcurrencyError`). That is another worker having moved the saga on, not a failed
attempt: the saga stays FINISHED with no attempt counted, and the participant still has one charge and one
commit (unfenced, A's failure count turned it FAILED, then DEAD_LETTER).
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import pytest

from tests.e2e.faults._orchestration import fault_run, rows, stalled

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]


async def test_a_frozen_recovery_worker_never_rewrites_a_finished_saga(
    e2e_database: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with fault_run(tmp_path, e2e_database, kafka_bootstrap) as (procs, engine):
        participant = procs.start("participant", "participant")
        await procs.ready(participant)
        execution_id = await stalled(
            e2e_database, procs.suffix, "slow", {"order": "o1", "execution": str(uuid.uuid4())}
        )
        recovery = {"interval": 0.3, "max_recovery_attempts": 1}
        a = procs.start(
            "worker-a", "orchestrator", env={"FAULT_SLOW_STEP": "8"}, lease_seconds=2.0, recovery=recovery
        )

        async def local_runs() -> list[int]:
            return [r["pid"] for r in await rows(engine, "SELECT pid FROM fault_local_runs ORDER BY id")]

        for _ in range(600):
            if await local_runs():
                break
            await asyncio.sleep(0.1)
        assert await local_runs() == [a.pid], procs.report()
        os.kill(a.pid, signal.SIGSTOP)

        b = procs.start("worker-b", "orchestrator", lease_seconds=30.0, recovery=recovery)

        async def state() -> dict[str, object]:
            (row,) = await rows(
                engine, "SELECT status, recovery_attempts FROM saga_executions WHERE id = :e", e=execution_id
            )
            return row

        async def decisions() -> list[str]:
            return [
                r["kind"]
                for r in await rows(engine, "SELECT kind FROM fault_commands WHERE kind <> 'command'")
            ]

        for _ in range(600):
            if (await state())["status"] == "finished" and await decisions():
                break
            await asyncio.sleep(0.1)
        assert (await state())["status"] == "finished", procs.report()
        assert await local_runs() == [a.pid, b.pid]

        os.kill(a.pid, signal.SIGCONT)
        # A's step ends as soon as it runs again (its sleep is long over); give its save, the recovery's
        # bookkeeping and any drive that would follow time to happen.
        await asyncio.sleep(6.0)
        assert a.process.poll() is None and b.process.poll() is None, procs.report()

        assert await state() == {"status": "finished", "recovery_attempts": 0}, procs.report()
        commands = await rows(engine, "SELECT step, kind FROM fault_commands ORDER BY id")
        assert [(c["kind"], c["step"]) for c in commands] == [("command", "charge"), ("commit", None)], (
            commands
        )
