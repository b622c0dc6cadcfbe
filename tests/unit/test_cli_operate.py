"""Operator commands: list filters, overdue marks, cancel, bulk retry (SQLite, as in test_cli_admin)."""

from __future__ import annotations

import asyncio
import io
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker import InMemoryBrokerPool
from saga import Saga, SagaContext, SagaManager, SagaRequest
from saga.cli import main
from storage import SagaStatus, SqlAlchemySagaStorage
from tests.unit import test_cli_admin
from tests.unit.test_cli_admin import Seeded, _record, cli, cli_json

seeded = test_cli_admin.seeded  # the same seeded SQLite database


def _add_overdue(url: str) -> uuid.UUID:
    async def go() -> uuid.UUID:
        async with SqlAlchemySagaStorage(url) as storage:
            record = _record(
                "demo-order",
                SagaStatus.PAUSED,
                reply_deadline=datetime.now(UTC) - timedelta(minutes=3),
                idempotency_key="late-1",
            )
            await storage.create(record)
            return record.id

    return asyncio.run(go())


def _status(url: str, saga_id: uuid.UUID) -> SagaStatus:
    async def go() -> SagaStatus:
        async with SqlAlchemySagaStorage(url) as storage:
            return (await storage.load(saga_id)).status

    return asyncio.run(go())


def test_list_filters(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    late = _add_overdue(seeded.url)
    config = str(seeded.config)
    data = cli_json(capsys, "list", "--config", config, "--overdue")
    assert isinstance(data, dict) and [e["id"] for e in data["executions"]] == [str(late)]
    assert data["executions"][0]["overdue"] is True
    data = cli_json(capsys, "list", "--config", config, "--idempotency-key", "order-1")
    assert isinstance(data, dict) and [e["id"] for e in data["executions"]] == [str(seeded.finished)]
    data = cli_json(capsys, "list", "--config", config, "--error", "BOOM")
    assert isinstance(data, dict) and [e["id"] for e in data["executions"]] == [str(seeded.failed)]
    data = cli_json(capsys, "list", "--config", config, "--since", "1h")
    assert isinstance(data, dict) and data["total"] == 7
    data = cli_json(capsys, "list", "--config", config, "--until", "2020-01-01T00:00:00")
    assert isinstance(data, dict) and data["total"] == 0
    code, out, _ = cli(capsys, "list", "--config", config)
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith(str(late)))
    assert "PAUSED (overdue)" in line


def test_list_rejects_a_bad_time(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "list", "--config", str(seeded.config), "--since", "yesterday")
    assert code == 2
    assert "--since: 'yesterday' is neither an ISO-8601 time" in err


def test_show_marks_overdue(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    late = _add_overdue(seeded.url)
    code, out, err = cli(capsys, "show", str(late), "--config", str(seeded.config))
    assert code == 0, err
    due = next(line for line in out.splitlines() if line.startswith("reply due:"))
    assert "OVERDUE by 3.0min" in due


def _reserve(ctx: SagaContext) -> None:
    ctx["reserved"] = True


def _unreserve(ctx: SagaContext) -> None:
    ctx["unreserved"] = True


def _pay(ctx: SagaContext) -> SagaRequest:
    return SagaRequest("pay", {"amount": 3})


CANCEL_SAGA = Saga("cli-cancel").local_step(_reserve).on_failure(_unreserve).remote_step(_pay).commit()


def test_cancel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cancel.sqlite3'}"
    config = tmp_path / "saga.yml"
    config.write_text(f"storage:\n  url: {url}\nsagas: ['tests.unit.test_cli_operate:CANCEL_SAGA']\n")

    async def start() -> uuid.UUID:
        async with SagaManager(SqlAlchemySagaStorage(url), InMemoryBrokerPool(), relay_outbox=False) as m:
            m.register(CANCEL_SAGA)
            return (await m.run(CANCEL_SAGA, pause_on_disk=True)).id

    saga_id = asyncio.run(start())
    code, out, err = cli(
        capsys, "cancel", str(saga_id), "--reason", "duplicate order", "--config", str(config)
    )
    assert code == 0, err
    assert out.startswith(f"execution {saga_id}: PAUSED -> ERRORED (cancelled)")
    assert _status(url, saga_id) is SagaStatus.ERRORED
    data = cli_json(capsys, "show", str(saga_id), "--config", str(config))
    assert isinstance(data, dict)
    assert data["error"] == {"step": None, "error": "duplicate order", "type": "cancelled"}
    assert data["context"]["unreserved"] is True
    code, _, err = cli(capsys, "cancel", str(saga_id), "--config", str(config))
    assert code == 1
    assert f"cannot cancel execution {saga_id}: it is errored" in err


def test_bulk_retry_asks_first(
    seeded: Seeded, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["retry", "--status", "dead_letter", "--name", "demo-order", "--config", str(seeded.config)]
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    code, out, err = cli(capsys, *argv)
    assert code == 1 and "1 execution(s) would move back to recovery (demo-order v1)" in out
    assert "nothing retried (not confirmed)" in err
    assert _status(seeded.url, seeded.dead) is SagaStatus.DEAD_LETTER

    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert "retried 1 execution;" in out
    assert _status(seeded.url, seeded.dead) is SagaStatus.FAILED


def test_bulk_retry_with_yes_and_nothing_left(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["retry", "--status", "dead_letter", "--yes", "--config", str(seeded.config)]
    code, out, _ = cli(capsys, *argv)
    assert code == 0 and "retried 1 execution;" in out
    code, out, _ = cli(capsys, *argv)
    assert code == 0 and out.strip() == "no executions match"


def test_retry_usage_errors(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(seeded.config)
    assert main(["retry", "--config", config]) == 2
    assert "retry needs an execution ID, or --status" in capsys.readouterr().err
    assert main(["retry", "--status", "finished", "--config", config]) == 2
    assert "only dead_letter and failed can be retried" in capsys.readouterr().err
    assert main(["retry", str(seeded.dead), "--status", "dead_letter", "--config", config]) == 2
