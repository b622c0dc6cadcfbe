"""Fault: an orchestrator whose wall clock is five minutes off must not double-run steps or time out early.

Processes: orchestrator ``behind`` (wall clock 300 s behind the database's) and ``ahead`` (300 s ahead),
each starting six ``timed`` sagas (a local step of 1 s that records its runs, then ``reserve`` with a 60 s
reply timeout); orchestrator ``steady`` (right clock) runs a recovery worker every 0.3 s; the participant
answers each ``reserve`` after 2 s and records every command in ``fault_commands`` (no unique constraint).

The skew is injected in the orchestrator processes' local-time readers (`skew_wall_clock`); the database's
and the processes' monotonic clocks are untouched. On the database's clock every lease and reply deadline
the skewed orchestrators set is the one a right clock sets: every ``run()`` ends FINISHED, each local step
ran once, each ``reserve`` was delivered once and no ``release`` was sent (unfenced, the clock 300 s behind
wrote leases already expired and reply deadlines already passed, so recovery ran the first steps a second
time at once and compensated sagas whose participants had succeeded).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.faults._orchestration import fault_run, rows

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]

PER_ORCHESTRATOR = 6
SKEW = 300.0


async def test_an_orchestrator_clock_five_minutes_off_changes_nothing(
    e2e_database: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with fault_run(tmp_path, e2e_database, kafka_bootstrap) as (procs, engine):
        participant = procs.start("participant", "participant", reply_delay={"reserve": 2.0})
        steady = procs.start("steady", "orchestrator", recovery={"interval": 0.3})
        await procs.ready(participant, steady)
        runs = [{"saga": "timed", "tag": f"saga{n}"} for n in range(PER_ORCHESTRATOR)]
        env = {"FAULT_SLOW_STEP": "1", "FAULT_SLOW_ASYNC": "1"}
        skewed = [
            procs.start(name, "orchestrator", env=env, skew_seconds=skew, runs=runs)
            for name, skew in (("behind", -SKEW), ("ahead", SKEW))
        ]
        await procs.wait_for(
            lambda: all(len(p.runs()) == PER_ORCHESTRATOR for p in skewed), 90, "every run() returned"
        )

        outcomes = [run for p in skewed for run in p.runs()]
        assert [run.get("status") for run in outcomes] == ["finished"] * len(outcomes), outcomes
        local = await rows(
            engine, "SELECT execution_id, count(*) AS n FROM fault_local_runs GROUP BY execution_id"
        )
        assert sorted(r["n"] for r in local) == [1] * len(outcomes), local
        commands = await rows(
            engine, "SELECT step, count(*) AS n FROM fault_commands WHERE kind = 'command' GROUP BY step"
        )
        assert {r["step"]: r["n"] for r in commands} == {"reserve": len(outcomes)}, commands
