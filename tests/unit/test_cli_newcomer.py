"""What a newcomer meets following the README on a fresh machine: each rough edge fixed, with a test.

Read-only commands that create nothing, errors that name the store and the fix, id prefixes, a closed
pipe, the current directory on the import path, ``consume_replies`` in YAML, and one log line (not two a
retry) while Kafka is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import uuid
from pathlib import Path

import pytest

from broker import BrokerConnectionError, KafkaBrokerPool
from saga.cli import main
from saga.config import build_manager
from storage import ExecutionRecord, SagaStatus, SqlAlchemySagaStorage, StorageError

EMBEDDED_STORE = (
    "no saga database at kafka-saga.sqlite3 (storage.url sqlite+aiosqlite:///./kafka-saga.sqlite3 from "
    "<embedded config/default.yml>)"
)


@pytest.fixture
def fresh_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory and no configuration in the environment: the README's first steps."""
    monkeypatch.chdir(tmp_path)
    for name in ("SAGA_CONFIG", "SAGA_SQLITE_PATH"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def seed(path: Path, *statuses: SagaStatus, ids: list[str] | None = None) -> list[uuid.UUID]:
    url = f"sqlite+aiosqlite:///{path}"
    chosen = [uuid.UUID(i) for i in ids] if ids else [uuid.uuid4() for _ in statuses]

    async def go() -> list[uuid.UUID]:
        async with SqlAlchemySagaStorage(url) as storage:
            records = [
                ExecutionRecord(id=i, name="order", definition_version=1, status=s, state=b"{}")
                for i, s in zip(chosen, statuses, strict=True)
            ]
            return [(await storage.create(r)).id for r in records]

    return asyncio.run(go())


def config(path: Path, body: str) -> str:
    path.write_text(body)
    return str(path)


# -- read-only commands --------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["stats"], ["list"], ["show", str(uuid.uuid4())], ["show", "3f2a9c"]])
def test_read_only_commands_create_nothing_and_name_the_store(
    fresh_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert EMBEDDED_STORE in err and "--config PATH or $SAGA_CONFIG" in err
    assert list(fresh_dir.iterdir()) == []


def test_the_readme_shows_that_message_as_printed(
    fresh_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("kafka-saga: no saga database at")]
    assert main(["stats"]) == 1
    assert capsys.readouterr().err == line + "\n"


def test_read_only_commands_do_not_migrate_and_point_to_db_upgrade(
    fresh_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = fresh_dir / "empty.sqlite3"
    sqlite3.connect(db).close()  # a database, but no saga tables
    path = config(fresh_dir / "s.yml", f"storage:\n  url: sqlite+aiosqlite:///{db}\n  auto_migrate: true\n")
    code, _, err = run(capsys, "stats", "--config", path)
    assert code == 1
    assert (
        "no such table: saga_executions; the database has no kafka-saga tables yet: run `kafka-saga db "
        in err
    )
    with sqlite3.connect(db) as conn:
        assert conn.execute("select name from sqlite_master").fetchall() == []  # not migrated


async def test_auto_migrate_off_on_a_fresh_database_points_to_db_upgrade(tmp_path: Path) -> None:
    async with SqlAlchemySagaStorage(
        f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", auto_migrate=False
    ) as storage:
        with pytest.raises(StorageError, match=r"no kafka-saga tables yet: run `kafka-saga db upgrade`"):
            await storage.load(uuid.uuid4())


def test_an_unknown_id_names_the_store_looked_in(fresh_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = fresh_dir / "s.sqlite3"
    seed(db, SagaStatus.FINISHED)
    path = config(fresh_dir / "s.yml", f"storage:\n  url: sqlite+aiosqlite:///{db}\n")
    missing = uuid.uuid4()
    code, _, err = run(capsys, "show", str(missing), "--config", path)
    assert code == 1
    where = f"storage.url sqlite+aiosqlite:///{db} from {path}"
    assert err == f"kafka-saga: saga execution {missing} not found in {where}\n"


# -- ids -----------------------------------------------------------------------------------------------


FINISHED_ID = "3f2a9c1e-0000-4000-8000-000000000001"
DEAD_ID = "3f2a77d0-0000-4000-8000-000000000002"


def test_commands_take_an_unambiguous_id_prefix(fresh_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = fresh_dir / "s.sqlite3"
    seed(db, SagaStatus.FINISHED, SagaStatus.DEAD_LETTER, ids=[FINISHED_ID, DEAD_ID])
    path = config(fresh_dir / "s.yml", f"storage:\n  url: sqlite+aiosqlite:///{db}\n")
    code, out, _ = run(capsys, "show", "3F2A9C", "--config", path)
    assert code == 0 and f"execution:   {FINISHED_ID}" in out
    code, out, _ = run(capsys, "retry", "3f2a77", "--config", path)
    assert code == 0 and f"execution {DEAD_ID}: DEAD_LETTER -> FAILED" in out
    code, _, err = run(capsys, "show", "3f2a", "--config", path)
    assert code == 1
    assert "'3f2a' is the start of several execution ids (3f2a" in err and "give more of it" in err
    code, _, err = run(capsys, "show", "0000", "--config", path)
    assert code == 1 and "no execution id starts with '0000' in storage.url" in err


# -- repairs and help ----------------------------------------------------------------------------------


def test_set_attempts_on_an_errored_execution_is_refused(
    fresh_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = fresh_dir / "s.sqlite3"
    (errored,) = seed(db, SagaStatus.ERRORED)
    path = config(fresh_dir / "s.yml", f"storage:\n  url: sqlite+aiosqlite:///{db}\n")
    code, out, err = run(capsys, "set-attempts", str(errored), "3", "--config", path)
    assert code == 1 and out == ""
    assert (
        f"execution {errored} is ERRORED, which recovery never picks up" in err
        and "nothing was changed" in err
    )
    code, out, _ = run(capsys, "show", str(errored), "--config", path, "--json")
    assert '"recovery_attempts": 0' in out


def test_retry_help_says_it_takes_failed_executions_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["retry", "--help"]) == 0
    assert "Move a DEAD_LETTER or FAILED execution back to recovery" in capsys.readouterr().out


# -- errors without tracebacks -------------------------------------------------------------------------


def test_a_postgres_url_is_a_config_error_with_the_fix(
    fresh_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(fresh_dir / "s.yml", "storage:\n  url: postgres://app:secret@db/orders\n")
    code, _, err = run(capsys, "stats", "--config", path)
    assert code == 2
    assert err == (
        f"kafka-saga: {path}: storage.url: 'postgres://app:***@db/orders': SQLAlchemy spells the scheme "
        "postgresql; use postgresql+asyncpg://app:***@db/orders\n"
    )


def test_db_upgrade_to_an_unknown_revision_lists_the_known_ones(
    fresh_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(fresh_dir / "s.yml", f"storage:\n  url: sqlite+aiosqlite:///{fresh_dir / 'x.db'}\n")
    code, _, err = run(capsys, "db", "upgrade", "--revision", "nope", "--config", path)
    assert code == 1
    assert err.startswith("kafka-saga: --revision 'nope': Can't locate revision identified by 'nope'")
    assert "(known revisions: head, 0001_initial, " in err and "Traceback" not in err


class _ClosedPipe:
    """A stdout whose reader went away: every write raises, as ``kafka-saga list | head`` meets it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self._fd


def test_a_closed_pipe_ends_quietly_with_141(
    fresh_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = fresh_dir / "s.sqlite3"
    seed(db, SagaStatus.FINISHED)
    path = config(fresh_dir / "s.yml", f"storage:\n  url: sqlite+aiosqlite:///{db}\n")
    with open(fresh_dir / "stdout", "w") as sink:
        monkeypatch.setattr(sys, "stdout", _ClosedPipe(sink.fileno()))
        code = main(["list", "--config", path])
    monkeypatch.undo()
    assert code == 141
    assert "Traceback" not in capsys.readouterr().err


# -- the import path and consume_replies ---------------------------------------------------------------


def test_a_module_in_the_current_directory_imports_from_the_console_script(
    fresh_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (fresh_dir / "kafka_saga_newcomer_sagas.py").write_text(
        "from saga import Saga\nSAGA = Saga('newcomer').local_step(lambda context: None).commit()\n"
    )
    path = config(
        fresh_dir / "s.yml",
        f"storage:\n  url: sqlite+aiosqlite:///{fresh_dir / 'x.db'}\n"
        "sagas: ['kafka_saga_newcomer_sagas:SAGA']\n",
    )
    # A console script's sys.path starts with its own directory, not the current one.
    cwd = os.getcwd()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", cwd)])
    missing = uuid.uuid4()
    code, _, err = run(capsys, "retry", str(missing), "--config", path)  # retry imports the sagas
    assert "cannot import module" not in err
    assert code == 1 and f"saga execution {missing} not found" in err


def test_consume_replies_in_yaml(fresh_dir: Path) -> None:
    starter = build_manager({"consumer": {"consume_replies": False}})
    assert starter.consume_replies is False
    assert build_manager({}).consume_replies is True


# -- an unreachable Kafka ------------------------------------------------------------------------------


async def test_an_unreachable_kafka_logs_one_line_not_two_per_retry(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    pool = KafkaBrokerPool(bootstrap_servers="127.0.0.1:1", connect_timeout=1.5)
    with pytest.raises(BrokerConnectionError, match=r"did not answer within 1\.5s"):
        await pool.start()
    await pool.stop()
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [r.name for r in loud] == ["broker.kafka"], [r.getMessage() for r in loud]
    assert "retrying for up to 1.5s (connect_timeout)" in loud[0].getMessage()
    retries = [r for r in caplog.records if r.name == "broker.kafka" and r.levelno == logging.DEBUG]
    assert len(retries) >= 2  # it did retry, quietly
