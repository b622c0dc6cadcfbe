"""Fault: one command the broker can never take must fail only its own saga, not stop every other one.

Processes: one orchestrator (`SagaManager` on PostgreSQL and Kafka, relay on) and one participant. Every
command the participant receives is a row of ``fault_commands`` (no unique constraint).

* Over the producer's limit (1.1 MB against ``max_request_size`` = 1 MiB): the size is checked before the
  command is stored, so ``run()`` ends ERRORED at once with a ``publish_rejected`` step error giving the size
  and the limit, and nothing is stored in the outbox. The five sagas started after it finish.
* Refused by the broker, stored already: the producer's limit raised to 5 MB so the command is stored and
  sent, and the broker (``message.max.bytes`` 1 MB) refuses it; a second saga's command goes to an invalid
  topic name. Each fails only its own step (``publish_rejected``, reason ``record_too_large`` or
  ``invalid_topic``); the five normal sagas finish, each command delivered once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.faults._orchestration import execution_rows, fault_run, rows

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]

#: Over the producer's default ``max_request_size`` (1 MiB) and the broker's default ``message.max.bytes``.
POISON = 1_100_000
NORMAL = 5
#: Commands delivered to the participant, per execution.
DELIVERED = (
    "SELECT execution_id::text AS e, count(*) AS n FROM fault_commands WHERE kind = 'command' GROUP BY 1"
)


def _runs(poison: list[dict[str, Any]]) -> list[dict[str, Any]]:
    normal = [
        {"saga": "poison", "context": {"size": 10}, "tag": f"normal{n}", "after": 0.5} for n in range(NORMAL)
    ]
    return [*poison, *normal]


async def _settle(procs: Any, orchestrator: Any, count: int) -> list[dict[str, Any]]:
    await procs.wait_for(lambda: len(orchestrator.runs()) >= count, 60, f"{count} runs ended")
    return orchestrator.runs()


def _step_error(execution: dict[str, Any]) -> dict[str, Any]:
    return next(step["error"] for step in execution["steps"] if step.get("error"))


async def test_a_command_over_the_producer_limit_fails_its_run_and_stores_nothing(
    e2e_database: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with fault_run(tmp_path, e2e_database, kafka_bootstrap) as (procs, engine):
        participant = procs.start("participant", "participant")
        await procs.ready(participant)
        poison = [{"saga": "poison", "context": {"size": POISON}, "tag": "poison"}]
        orchestrator = procs.start("orchestrator", "orchestrator", runs=_runs(poison))
        runs = {run["tag"]: run for run in await _settle(procs, orchestrator, 1 + NORMAL)}

        assert runs["poison"]["status"] == "errored", runs["poison"]
        assert all(runs[f"normal{n}"]["status"] == "finished" for n in range(NORMAL)), runs
        executions = {str(e["id"]): e for e in await execution_rows(engine)}
        error = _step_error(executions[runs["poison"]["id"]])
        assert error["type"] == "publish_rejected" and error["reason"] == "record_too_large"
        assert error["size"] > error["limit"] == 1048576
        outbox = await rows(
            engine, "SELECT count(*) AS n FROM saga_outbox WHERE execution_id = :e", e=runs["poison"]["id"]
        )
        assert outbox == [{"n": 0}]  # never stored
        commands = await rows(
            engine,
            DELIVERED,
        )
        delivered = {r["e"]: r["n"] for r in commands}
        assert runs["poison"]["id"] not in delivered
        assert sorted(delivered.get(runs[f"normal{n}"]["id"], 0) for n in range(NORMAL)) == [1] * NORMAL


async def test_commands_the_broker_refuses_fail_only_their_own_step(
    e2e_database: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with fault_run(tmp_path, e2e_database, kafka_bootstrap) as (procs, engine):
        participant = procs.start("participant", "participant")
        await procs.ready(participant)
        poison = [
            {"saga": "poison", "context": {"size": POISON}, "tag": "too_large"},
            {"saga": "poison", "context": {"size": 10, "topic": "not a valid topic!"}, "tag": "bad_topic"},
        ]
        orchestrator = procs.start(
            "orchestrator",
            "orchestrator",
            runs=_runs(poison),
            kafka={"max_request_size": 5_000_000},  # the producer sends it; the broker refuses it
        )
        runs = {run["tag"]: run for run in await _settle(procs, orchestrator, 2 + NORMAL)}

        assert all(runs[f"normal{n}"]["status"] == "finished" for n in range(NORMAL)), runs
        executions = {str(e["id"]): e for e in await execution_rows(engine)}
        for tag, reason in (("too_large", "record_too_large"), ("bad_topic", "invalid_topic")):
            assert runs[tag]["status"] == "errored", runs[tag]
            error = _step_error(executions[runs[tag]["id"]])
            assert error["type"] == "publish_rejected" and error["reason"] == reason, error
        refused = await rows(
            engine,
            "SELECT outcome, error->>'reason' AS reason FROM saga_outbox"
            " WHERE execution_id IN (:a, :b) ORDER BY id",
            a=runs["too_large"]["id"],
            b=runs["bad_topic"]["id"],
        )
        assert [r["outcome"] for r in refused] == ["rejected", "rejected"], refused
        unsent = await rows(engine, "SELECT count(*) AS n FROM saga_outbox WHERE sent_at IS NULL")
        assert unsent == [{"n": 0}]
        commands = await rows(
            engine,
            DELIVERED,
        )
        delivered = {r["e"]: r["n"] for r in commands}
        assert sorted(delivered.get(runs[f"normal{n}"]["id"], 0) for n in range(NORMAL)) == [1] * NORMAL
        assert runs["too_large"]["id"] not in delivered and runs["bad_topic"]["id"] not in delivered
