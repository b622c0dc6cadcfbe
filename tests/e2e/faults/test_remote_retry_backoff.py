"""Fault: a remote step answered 500 is retried after its policy's delays, decided from storage.

Processes: orchestrator A, then B; the participant answers the first two ``charge`` commands of the saga
with 500, then 200, and records every command in ``fault_commands`` (no unique constraint, the database's
``clock_timestamp()``).

The step's policy is ``RetryPolicy(max_attempts=3, initial_delay=2, backoff=2)``: the second command must
not go out before 2 s after the first 500 was applied, the third not before 4 s after the second 500. The
delay is stored with the new command (its outbox row is due then, on the database's clock), so A is
SIGKILLed right after applying the first 500 and B, started afterwards, keeps the schedule. (Without the
backoff the three commands went out within milliseconds.)
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest

from tests.e2e.faults._orchestration import fault_run, rows

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]

DELAY = 2.0


async def test_a_500_reply_is_retried_after_the_policy_delays_across_a_restart(
    e2e_database: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with fault_run(tmp_path, e2e_database, kafka_bootstrap) as (procs, engine):
        participant = procs.start("participant", "participant", fail_first={"charge": 2})
        await procs.ready(participant)
        env = {"FAULT_RETRY_DELAY": str(DELAY)}
        a = procs.start(
            "orchestrator-a", "orchestrator", env=env, runs=[{"saga": "flaky", "pause_on_disk": True}]
        )

        async def applied() -> list[dict[str, object]]:
            return await rows(
                engine, "SELECT status, received_at FROM saga_replies WHERE outcome = 'applied' ORDER BY id"
            )

        async def first_applied() -> bool:
            return len(await applied()) >= 1

        await procs.wait_for_async(first_applied, 60, "the first 500 applied")
        os.kill(a.pid, signal.SIGKILL)
        b = procs.start("orchestrator-b", "orchestrator", env=env, relay_interval=0.2)

        async def finished() -> bool:
            found = await rows(engine, "SELECT status FROM saga_executions")
            return found == [{"status": "finished"}]

        await procs.wait_for_async(finished, 90, "the saga finished")
        assert b.process.poll() is None

        commands = await rows(
            engine, "SELECT step, replied, received_at FROM fault_commands WHERE kind = 'command' ORDER BY id"
        )
        assert [(c["step"], c["replied"]) for c in commands] == [
            ("charge", 500),
            ("charge", 500),
            ("charge", 200),
        ]
        replies = await applied()
        assert [r["status"] for r in replies] == [500, 500, 200]
        # Each retry went out no sooner than its delay after the 500 it answers was applied.
        assert commands[1]["received_at"] - replies[0]["received_at"] >= timedelta(seconds=DELAY)
        assert commands[2]["received_at"] - replies[1]["received_at"] >= timedelta(seconds=2 * DELAY)
