"""Administration commands against a SQLite database seeded with executions: tables and --json."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from saga.cli import main
from storage import (
    ExecutionRecord,
    ReplyRecord,
    SagaStatus,
    SqlAlchemySagaStorage,
    StepRecord,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@dataclass
class Seeded:
    config: Path
    url: str
    finished: uuid.UUID
    errored: uuid.UUID
    failed: uuid.UUID
    dead: uuid.UUID
    paused: uuid.UUID
    other_saga: uuid.UUID


def _state(context: dict[str, object]) -> bytes:
    return orjson.dumps({"v": 1, "ctx": context})


def _record(name: str, status: SagaStatus, **fields: object) -> ExecutionRecord:
    return ExecutionRecord(
        id=uuid.uuid4(),
        name=name,
        definition_version=1,
        status=status,
        state=_state({"order_id": f"order-{status.value}"}),
        **fields,  # type: ignore[arg-type]
    )


async def _seed(url: str) -> dict[str, uuid.UUID]:
    reserve_request = uuid.uuid4()
    charge_request = uuid.uuid4()
    steps_errored = (
        StepRecord("create_order", "local", "execute", "succeeded", 1, T0, T0 + timedelta(milliseconds=2)),
        StepRecord(
            "reserve_stock",
            "remote",
            "execute",
            "succeeded",
            1,
            T0,
            T0 + timedelta(seconds=1),
            reserve_request,
        ),
        StepRecord(
            "charge_payment",
            "remote",
            "execute",
            "failed",
            2,
            T0 + timedelta(seconds=1),
            T0 + timedelta(seconds=3),
            charge_request,
            {"step": "charge_payment", "error": "participant payment replied 400", "type": "reply"},
        ),
        StepRecord("reserve_stock", "remote", "compensate", "succeeded", 1, T0 + timedelta(seconds=3)),
    )
    records = {
        "finished": _record("demo-order", SagaStatus.FINISHED, idempotency_key="order-1"),
        "errored": _record(
            "demo-order",
            SagaStatus.ERRORED,
            steps=steps_errored,
            error={"step": "charge_payment", "error": "participant payment replied 400", "type": "reply"},
        ),
        "failed": _record(
            "demo-order",
            SagaStatus.FAILED,
            recovery_attempts=2,
            error={"step": "create_order", "error": "boom", "type": "RuntimeError"},
        ),
        "dead": _record(
            "demo-order",
            SagaStatus.DEAD_LETTER,
            recovery_attempts=5,
            error={
                "type": "recovery_exhausted",
                "attempts": 5,
                "step": "charge_payment",
                "last_error": {"type": "TimeoutError", "message": "no reply"},
            },
        ),
        "paused": _record("demo-order", SagaStatus.PAUSED),
        "other_saga": _record("refund", SagaStatus.FINISHED),
    }
    async with SqlAlchemySagaStorage(url) as storage:
        for record in records.values():
            await storage.create(record)
        await storage.record_reply(ReplyRecord(records["errored"].id, reserve_request, 200, "applied"))
        await storage.record_reply(ReplyRecord(records["errored"].id, charge_request, 400, "applied"))
        await storage.record_reply(
            ReplyRecord(records["errored"].id, charge_request, 400, "duplicate", reason="duplicate")
        )
    return {name: record.id for name, record in records.items()}


@pytest.fixture
def seeded(tmp_path: Path) -> Seeded:
    url = f"sqlite+aiosqlite:///{tmp_path / 'sagas.sqlite3'}"
    ids = asyncio.run(_seed(url))
    config = tmp_path / "saga.yml"
    config.write_text(f"storage:\n  url: {url}\n  auto_migrate: true\nsagas: ['saga.demo:ORDER_SAGA']\n")
    return Seeded(config=config, url=url, **ids)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    code, out, err = cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


# -- list ----------------------------------------------------------------------------------------------


def test_config_before_or_after_the_command(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    """`kafka-saga --config F stats` and `kafka-saga stats --config F` read the same file."""
    before = cli(capsys, "--config", str(seeded.config), "stats", "--json")
    after = cli(capsys, "stats", "--json", "--config", str(seeded.config))
    assert before[0] == after[0] == 0
    assert json.loads(before[1]) == json.loads(after[1])
    assert json.loads(before[1])["counts"]["finished"] == 2


def test_list_table(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "list", "--config", str(seeded.config))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "SAGA",
        "STATUS",
        "RECOVERY",
        "CREATED",
        "(UTC)",
        "UPDATED",
        "(UTC)",
        "ERROR",
    ]
    body = lines[1:-1]
    assert len(body) == 6
    assert lines[-1] == "1-6 of 6 executions"
    by_id = {line.split()[0]: line for line in body}
    assert "FAILED" in by_id[str(seeded.failed)]
    assert "RuntimeError: boom" in by_id[str(seeded.failed)]
    assert "refund v1" in by_id[str(seeded.other_saga)]


def test_list_json_with_filters(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    data = cli_json(capsys, "list", "--config", str(seeded.config), "--status", "failed,dead_letter")
    assert isinstance(data, dict)
    assert data["total"] == 2
    assert {e["id"] for e in data["executions"]} == {str(seeded.failed), str(seeded.dead)}
    assert {e["status"] for e in data["executions"]} == {"failed", "dead_letter"}
    data = cli_json(capsys, "list", "--config", str(seeded.config), "--name", "refund")
    assert isinstance(data, dict)
    assert [e["id"] for e in data["executions"]] == [str(seeded.other_saga)]


def test_list_paging(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    first = cli_json(capsys, "list", "--config", str(seeded.config), "--limit", "4")
    second = cli_json(capsys, "list", "--config", str(seeded.config), "--limit", "4", "--offset", "4")
    assert isinstance(first, dict) and isinstance(second, dict)
    assert (first["total"], len(first["executions"])) == (6, 4)
    assert (second["total"], len(second["executions"]), second["offset"]) == (6, 2, 4)
    ids = [e["id"] for e in first["executions"] + second["executions"]]
    assert len(set(ids)) == 6
    code, out, _ = cli(capsys, "list", "--config", str(seeded.config), "--limit", "4", "--offset", "4")
    assert code == 0
    assert out.splitlines()[-1] == "5-6 of 6 executions"


def test_list_nothing_matches(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "list", "--config", str(seeded.config), "--status", "compensating")
    assert code == 0
    assert out.splitlines()[-1] == "no executions match"


# -- show ----------------------------------------------------------------------------------------------


def test_show_table(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "show", str(seeded.errored), "--config", str(seeded.config))
    assert code == 0, err
    assert f"execution:   {seeded.errored}" in out
    assert "status:      ERRORED" in out
    assert "error:       reply: participant payment replied 400" in out
    assert 'order_id: "order-errored"' in out
    steps = out[out.index("Steps (4)") : out.index("Replies")].splitlines()
    assert steps[1].split()[:4] == ["#", "STEP", "KIND", "PHASE"]
    charge = next(line for line in steps if "charge_payment" in line)
    assert charge.split()[:7] == ["3", "charge_payment", "remote", "execute", "FAILED", "2", "2026-01-02"]
    assert "2.00s" in charge
    assert "reply: participant payment replied 400" in charge
    assert any(line.split()[1:4] == ["reserve_stock", "remote", "compensate"] for line in steps[2:] if line)
    replies = out[out.index("Replies (3)") :].splitlines()
    assert sum("charge_payment (execute)" in line for line in replies) == 2
    assert any("duplicate" in line.split() for line in replies)


def test_show_json(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    data = cli_json(capsys, "show", str(seeded.errored), "--config", str(seeded.config))
    assert isinstance(data, dict)
    assert data["id"] == str(seeded.errored)
    assert data["status"] == "errored"
    assert data["context"] == {"order_id": "order-errored"}
    assert [s["name"] for s in data["steps"]] == [
        "create_order",
        "reserve_stock",
        "charge_payment",
        "reserve_stock",
    ]
    charge = data["steps"][2]
    assert charge["attempts"] == 2
    assert charge["duration_seconds"] == 2.0
    assert charge["error"]["type"] == "reply"
    assert [r["outcome"] for r in data["replies"]] == ["applied", "applied", "duplicate"]
    assert data["replies"][1]["status"] == 400


# -- stats / dead-letter -------------------------------------------------------------------------------


def test_stats(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "stats", "--config", str(seeded.config))
    assert code == 0
    rows = dict(line.split() for line in out.splitlines()[1:])
    assert rows == {
        "CREATED": "0",
        "RUNNING": "0",
        "PAUSED": "1",
        "COMPENSATING": "0",
        "FINISHED": "2",
        "ERRORED": "1",
        "FAILED": "1",
        "DEAD_LETTER": "1",
        "TOTAL": "6",
    }
    data = cli_json(capsys, "stats", "--config", str(seeded.config))
    assert data == {
        "counts": {
            "created": 0,
            "running": 0,
            "paused": 1,
            "compensating": 0,
            "finished": 2,
            "errored": 1,
            "failed": 1,
            "dead_letter": 1,
        },
        "total": 6,
        "unregistered": [],
    }


def test_dead_letter(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "dead-letter", "--config", str(seeded.config))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "SAGA", "RECOVERY"]
    assert lines[1].startswith(str(seeded.dead))
    assert "charge_payment" in lines[1]
    assert "recovery_exhausted: TimeoutError: no reply" in lines[1]
    assert lines[2] == "1-1 of 1 dead-lettered execution"
    data = cli_json(capsys, "dead-letter", "--config", str(seeded.config))
    assert isinstance(data, dict)
    assert [e["id"] for e in data["executions"]] == [str(seeded.dead)]
    assert data["executions"][0]["error"]["last_error"] == {"type": "TimeoutError", "message": "no reply"}


# -- repairs -------------------------------------------------------------------------------------------


def test_set_attempts(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "set-attempts", str(seeded.failed), "0", "--config", str(seeded.config))
    assert code == 0
    assert out.splitlines()[0] == f"execution {seeded.failed}: recovery attempts 2 -> 0 (status FAILED)"
    data = cli_json(capsys, "set-attempts", str(seeded.failed), "4", "--config", str(seeded.config))
    assert isinstance(data, dict)
    assert (data["recovery_attempts"], data["previous_recovery_attempts"]) == (4, 0)


def test_retry_moves_dead_letter_back_to_recovery(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "retry", str(seeded.dead), "--config", str(seeded.config))
    assert code == 0, err
    assert out.splitlines()[0] == f"execution {seeded.dead}: DEAD_LETTER -> FAILED, recovery attempts 5 -> 0"
    data = cli_json(capsys, "show", str(seeded.dead), "--config", str(seeded.config))
    assert isinstance(data, dict)
    assert (data["status"], data["recovery_attempts"]) == ("failed", 0)


def test_retry_json(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    data = cli_json(capsys, "retry", str(seeded.dead), "--config", str(seeded.config))
    assert isinstance(data, dict)
    assert (data["status"], data["previous_status"], data["previous_recovery_attempts"]) == (
        "failed",
        "dead_letter",
        5,
    )


def test_retry_refuses_other_statuses(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "retry", str(seeded.finished), "--config", str(seeded.config))
    assert code == 1
    assert out == ""
    assert err == (
        f"kafka-saga: cannot retry execution {seeded.finished}: it is finished, not dead_letter or failed\n"
    )


def test_replay_needs_a_shared_broker(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "replay", str(seeded.paused), "--config", str(seeded.config))
    assert code == 1
    assert "replay publishes the pending command, and broker.type is memory" in err


@pytest.mark.parametrize("command", ["show", "retry", "replay", "set-attempts"])
def test_unknown_ids(seeded: Seeded, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    missing = uuid.uuid4()
    argv = [
        command,
        str(missing),
        *(["3"] if command == "set-attempts" else []),
        "--config",
        str(seeded.config),
    ]
    code, out, err = cli(capsys, *argv)
    assert code == 1
    assert out == ""
    assert err == (
        f"kafka-saga: saga execution {missing} not found in storage.url {seeded.url} from {seeded.config}\n"
    )


# -- db upgrade ----------------------------------------------------------------------------------------


def test_db_upgrade_creates_the_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    database = tmp_path / "fresh.sqlite3"
    config = tmp_path / "saga.yml"
    config.write_text(f"storage:\n  url: sqlite+aiosqlite:///{database}\n  auto_migrate: false\n")
    code, out, err = cli(capsys, "db", "upgrade", "--config", str(config))
    assert code == 0, err
    assert out == "database schema is at head\n"
    assert database.exists()
    code, out, err = cli(capsys, "stats", "--config", str(config), "--json")
    assert code == 0, err
    assert json.loads(out)["total"] == 0
    code, out, _ = cli(capsys, "db", "upgrade", "--config", str(config))
    assert code == 0  # idempotent


def test_db_upgrade_on_memory_storage(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "saga.yml"
    config.write_text("storage:\n  url: memory://\n")
    code, out, _ = cli(capsys, "db", "upgrade", "--config", str(config))
    assert code == 0
    assert out == "storage.url is memory://: there is no database schema to upgrade\n"
