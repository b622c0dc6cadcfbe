"""Fault: a command left unsent by a dead process must not be published once its step was undone.

Processes: orchestrator A, which stores a saga's ``reserve`` command (claimed for its 15 s lease) and exits
before publishing it; orchestrator B, with a recovery worker and the outbox relay; the participant, which
records every command it receives in ``fault_commands`` (no unique constraint, no dedup).

The reservation's reply is awaited 3 s: B's recovery finds it overdue and compensates (``release``), which
moves the execution past the reservation's request and, in the same transaction, cancels its unsent row.
When A's lease on that row runs out, B's relay must not publish it: the participant receives ``release``
once and ``reserve`` never (unfenced, it received ``reserve`` after ``release``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.e2e.faults._orchestration import execution_rows, fault_run, rows

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]

LEASE = 15.0


async def test_a_command_left_unsent_is_not_published_after_its_step_was_compensated(
    e2e_database: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with fault_run(tmp_path, e2e_database, kafka_bootstrap) as (procs, engine):
        participant = procs.start("participant", "participant")
        await procs.ready(participant)
        a = procs.start(
            "orchestrator-a",
            "orchestrator",
            lease_seconds=LEASE,
            crash_before_publish=1,
            runs=[{"saga": "reserve", "pause_on_disk": True}],
        )
        await procs.wait_for(lambda: a.process.poll() is not None, 60, "A exited before publishing")
        assert a.lines("CRASH") == ["before_publish"]
        (execution,) = await execution_rows(engine)
        unsent = await rows(engine, "SELECT claimed_by FROM saga_outbox WHERE sent_at IS NULL")
        assert len(unsent) == 1 and unsent[0]["claimed_by"].startswith("orchestrator-a")

        b = procs.start(
            "orchestrator-b",
            "orchestrator",
            lease_seconds=LEASE,
            relay_interval=0.3,
            recovery={"interval": 0.3},
        )
        await procs.ready(b)

        async def ended() -> str:
            (row,) = await rows(engine, "SELECT status FROM saga_executions WHERE id = :e", e=execution["id"])
            return str(row["status"])

        for _ in range(300):
            if await ended() == "errored":
                break
            await asyncio.sleep(0.1)
        assert await ended() == "errored", procs.report()
        # Until A's claim on the row has run out and B's relay has made several passes since.
        for _ in range(300):
            live = await rows(engine, "SELECT count(*) AS n FROM saga_outbox WHERE claimed_until > now()")
            if live == [{"n": 0}]:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)

        received = await rows(
            engine, "SELECT step, received_at FROM fault_commands WHERE kind = 'command' ORDER BY id"
        )
        assert [r["step"] for r in received] == ["release"], received
        (original,) = await rows(engine, "SELECT outcome FROM saga_outbox WHERE topic LIKE 'fault_reserve_%'")
        assert original["outcome"] == "cancelled"
