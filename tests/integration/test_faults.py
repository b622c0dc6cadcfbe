"""Faults at the edges: configuration errors, a database that does not answer, a broker that does not answer.

Every case runs the real ``kafka-saga`` command in a subprocess (as an operator would) and checks the same
four things: a clear one-line message naming what is wrong (the key, the host), a non-zero exit code (2 for
configuration, 1 for an unreachable service), no traceback and no password in the output, and nothing
half-written (no SQLite file created by a run that failed before it needed one; no rows left by a run that
failed after its storage came up). A few library-level checks (``SagaManager.from_config``, ``setup()``,
``SagaParticipant.start()``) follow the same rules for code that embeds the engine.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from broker import BrokerConnectionError, KafkaBrokerPool
from saga import SagaConfigError, SagaManager, SagaParticipant
from saga.config import build_manager
from storage import StorageError, StorageUnavailableError

REPO = Path(__file__).resolve().parents[2]
SECRET = f"S3cret-{uuid.uuid4().hex[:8]}"
DOWN_DB = f"postgresql+asyncpg://saga:{SECRET}@127.0.0.1:1/nowhere"
#: Seconds a broker that does not answer is given before the command gives up.
CONNECT_TIMEOUT = 2


def kafka_saga(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    """Run ``kafka-saga ARGS`` in a subprocess; return (exit code, stdout, stderr, seconds)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    environ.update(PYTHONPATH=str(REPO), **(env or {}))
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "saga.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=environ,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr, time.monotonic() - began


def assert_clean_failure(code: int, out: str, err: str, *, expected_code: int, message: str) -> None:
    both = out + err
    assert code == expected_code, f"exit {code}, expected {expected_code}\n{both}"
    assert message in err, f"{message!r} not in stderr:\n{err}"
    assert "Traceback" not in both, both
    assert SECRET not in both, both
    assert err.strip().splitlines()[-1].startswith("kafka-saga: "), err


# -- configuration errors ---------------------------------------------------------------------------

CONFIG_ERRORS = {
    "misspelt-key": (
        "recovery:\n  intervall: 1\n",
        "recovery.intervall: unknown key (did you mean 'interval'?)",
    ),
    "wrong-type": ("recovery:\n  interval: fast\n", "recovery.interval: expected a number, got 'fast'"),
    "out-of-range": ("recovery:\n  batch_size: 0\n", "recovery.batch_size: must be at least 1, got 0"),
    "missing-env": (
        "service:\n  name: ${KS_FAULTS_UNSET_VARIABLE}\n",
        "service.name: environment variable KS_FAULTS_UNSET_VARIABLE is not set and has no default",
    ),
    "bad-yaml": ("recovery: [interval: 1\n", "invalid YAML at line"),
    "unknown-choice": ("broker:\n  type: rabbitmq\n", "broker.type: expected one of 'memory', 'kafka'"),
    "kafka-without-address": ("broker:\n  type: kafka\n", "broker.kafka.bootstrap_servers: missing value"),
    "bad-kafka-setting": (
        "broker:\n  type: kafka\n  kafka:\n    bootstrap_servers: 127.0.0.1:1\n    sasl_mechanism: MD5\n",
        "broker.kafka.sasl_mechanism",
    ),
    "saga-not-importable": (
        "sagas:\n  - kafka_saga_no_such_module:SAGA\n",
        "sagas[0]: cannot import module 'kafka_saga_no_such_module'",
    ),
    "saga-not-a-saga": ("sagas:\n  - os:getcwd\n", "sagas[0]: 'os:getcwd' is a builtin_function_or_method"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_configuration_errors_exit_2_naming_the_key_and_write_nothing(case: str, tmp_path: Path) -> None:
    body, message = CONFIG_ERRORS[case]
    database = tmp_path / "never.sqlite3"
    config = tmp_path / "broken.yml"
    config.write_text(f"storage:\n  url: sqlite+aiosqlite:///{database}\n{body}", encoding="utf-8")
    # Admin commands only read storage, so they do not import the listed sagas; the worker does.
    commands = [["worker"]] if case.startswith("saga-") else [["worker"], ["stats"]]
    for command in commands:
        code, out, err, _ = kafka_saga(*command, "--config", str(config), cwd=tmp_path)
        assert_clean_failure(code, out, err, expected_code=2, message=message)
        assert f"kafka-saga: {config}: " in err, err  # names the file too
    assert not database.exists(), "a configuration error must fail before anything is created"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yml"]


def test_a_missing_configuration_file_exits_2(tmp_path: Path) -> None:
    code, out, err, _ = kafka_saga("worker", "--config", str(tmp_path / "nope.yml"), cwd=tmp_path)
    assert_clean_failure(code, out, err, expected_code=2, message="configuration file not found")
    assert list(tmp_path.iterdir()) == []


# -- a database that does not answer ----------------------------------------------------------------


def down_db_config(tmp_path: Path, url: str = DOWN_DB) -> Path:
    config = tmp_path / "down.yml"
    config.write_text(f"storage:\n  url: {url}\nsagas:\n  - saga.demo:ORDER_SAGA\n", encoding="utf-8")
    return config


DB_COMMANDS = {
    "worker": ["worker"],
    "stats": ["stats"],
    "list": ["list"],
    "show": ["show", str(uuid.uuid4())],
    "retry": ["retry", str(uuid.uuid4())],
    "dead-letter": ["dead-letter"],
    "db-upgrade": ["db", "upgrade"],
}


@pytest.mark.parametrize("name", sorted(DB_COMMANDS))
def test_a_database_that_does_not_answer_is_named_with_its_password_hidden(name: str, tmp_path: Path) -> None:
    config = down_db_config(tmp_path)
    code, out, err, seconds = kafka_saga(*DB_COMMANDS[name], "--config", str(config), cwd=tmp_path)
    assert_clean_failure(code, out, err, expected_code=1, message="127.0.0.1:1")
    assert "postgresql+asyncpg://saga:***@127.0.0.1:1/nowhere" in err, err
    assert seconds < 30, f"took {seconds:.1f}s"


@pytest.mark.postgres
def test_a_wrong_database_password_is_a_clear_error(database_url: str, tmp_path: Path) -> None:
    url = make_url(database_url).set(password=SECRET).render_as_string(hide_password=False)
    code, out, err, _ = kafka_saga("stats", "--config", str(down_db_config(tmp_path, url)), cwd=tmp_path)
    host = f"{make_url(database_url).host}:{make_url(database_url).port}"
    assert_clean_failure(code, out, err, expected_code=1, message=host)
    assert "password authentication failed" in err, err


# -- a broker that does not answer ------------------------------------------------------------------


def down_kafka_config(tmp_path: Path, storage_url: str) -> Path:
    config = tmp_path / "kafka-down.yml"
    config.write_text(
        f"""
service:
  name: faults
broker:
  type: kafka
  kafka:
    bootstrap_servers: 127.0.0.1:1
    connect_timeout: {CONNECT_TIMEOUT}
storage:
  url: {storage_url}
sagas:
  - saga.demo:ORDER_SAGA
""",
        encoding="utf-8",
    )
    return config


def test_a_broker_that_does_not_answer_fails_within_the_connect_timeout(tmp_path: Path) -> None:
    database = tmp_path / "worker.sqlite3"
    config = down_kafka_config(tmp_path, f"sqlite+aiosqlite:///{database}")
    code, out, err, seconds = kafka_saga("worker", "--config", str(config), cwd=tmp_path)
    assert_clean_failure(
        code,
        out,
        err,
        expected_code=1,
        message=f"BrokerConnectionError: Kafka at 127.0.0.1:1 did not answer within {CONNECT_TIMEOUT}s",
    )
    assert CONNECT_TIMEOUT <= seconds < CONNECT_TIMEOUT + 15, f"took {seconds:.1f}s"
    assert_no_saga_rows(f"sqlite+aiosqlite:///{database}", database.exists())


def assert_no_saga_rows(url: str, exists: bool = True) -> None:
    """Either nothing was created, or the schema is complete (at head) and holds no row at all."""
    if not exists:
        return

    async def check() -> None:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                version = (await conn.execute(text("SELECT version_num FROM saga_alembic_version"))).all()
                from alembic.script import ScriptDirectory

                from storage.migrate import alembic_config

                head = ScriptDirectory.from_config(alembic_config()).get_current_head()
                assert [tuple(v) for v in version] == [(head,)], f"schema half-migrated: {version}"
                for table in ("saga_executions", "saga_outbox", "saga_replies", "saga_command_replies"):
                    count = (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
                    assert count == 0, f"{table}: {count} rows left by a run that failed"
        finally:
            await engine.dispose()

    asyncio.run(check())


@pytest.fixture
async def fresh_database(database_url: str) -> AsyncIterator[str]:
    """A PostgreSQL database of this test's own, dropped afterwards."""
    name = f"faults_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(database_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


@pytest.mark.postgres
async def test_a_worker_whose_broker_is_down_leaves_no_rows_in_postgres(
    fresh_database: str, tmp_path: Path
) -> None:
    config = down_kafka_config(tmp_path, fresh_database)
    code, out, err, seconds = await asyncio.to_thread(
        kafka_saga, "worker", "--config", str(config), cwd=tmp_path
    )
    assert_clean_failure(code, out, err, expected_code=1, message="BrokerConnectionError")
    assert seconds < CONNECT_TIMEOUT + 15
    await asyncio.to_thread(assert_no_saga_rows, fresh_database)


# -- the same rules for code that embeds the engine ---------------------------------------------------


def test_from_config_raises_a_config_error_naming_the_key() -> None:
    with pytest.raises(SagaConfigError) as info:
        SagaManager.from_config({"recovery": {"lease_secnds": 3}})
    assert info.value.key == "recovery.lease_secnds"
    assert "did you mean 'lease_seconds'" in str(info.value)


async def test_setup_against_a_database_that_does_not_answer() -> None:
    manager = build_manager({"storage": {"url": DOWN_DB}})
    began = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        await manager.setup()
    assert time.monotonic() - began < 10
    assert "127.0.0.1:1" in str(info.value) and SECRET not in str(info.value)
    assert info.value.retriable
    await manager.storage.stop()


async def test_setup_and_participant_against_a_broker_that_does_not_answer(tmp_path: Path) -> None:
    database = tmp_path / "lib.sqlite3"
    manager = build_manager(
        {
            "broker": {
                "type": "kafka",
                "kafka": {"bootstrap_servers": "127.0.0.1:1", "connect_timeout": CONNECT_TIMEOUT},
            },
            "storage": {"url": f"sqlite+aiosqlite:///{database}"},
        }
    )
    began = time.monotonic()
    with pytest.raises(BrokerConnectionError, match=r"127\.0\.0\.1:1 did not answer within"):
        await manager.setup()
    assert CONNECT_TIMEOUT <= time.monotonic() - began < CONNECT_TIMEOUT + 5
    await manager.storage.stop()
    await asyncio.to_thread(assert_no_saga_rows, f"sqlite+aiosqlite:///{database}", database.exists())

    pool = KafkaBrokerPool(bootstrap_servers="127.0.0.1:1", connect_timeout=CONNECT_TIMEOUT)
    participant = SagaParticipant("faults", pool)
    participant.command("FaultsCommand")(lambda request: None)
    began = time.monotonic()
    with pytest.raises(BrokerConnectionError):
        await participant.start()
    assert time.monotonic() - began < CONNECT_TIMEOUT + 5
    assert not participant.running


def test_storage_errors_are_not_retriable_when_the_query_is_wrong() -> None:
    # The retriable flag is what recovery and the consumers rely on to ride out an outage; a storage error
    # that is the caller's fault must not be taken for one.
    assert StorageUnavailableError.retriable and not StorageError.retriable


# -- a broker restart must not leave a publisher broken -----------------------------------------------


@pytest.mark.kafka
async def test_a_publisher_recovers_from_an_out_of_order_sequence(kafka_bootstrap: str) -> None:
    from broker import BrokerError, BrokerMessage

    pool = KafkaBrokerPool(bootstrap_servers=kafka_bootstrap, request_timeout_ms=10_000)
    async with pool:
        message = BrokerMessage(f"faults-sequence-{uuid.uuid4().hex[:8]}", b"key", b"{}")
        await pool.publisher().send(message)
        # What a lost batch leaves behind: the producer's sequence for the partition ahead of the broker's
        # (reproduced in the crash suite by restarting Kafka while participants publish replies).
        sequences = pool._producer._txn_manager._sequence_numbers  # type: ignore[union-attr]
        for partition in list(sequences):
            sequences[partition] += 5
        with pytest.raises(BrokerError) as info:
            await pool.publisher().send(message)
        assert info.value.retriable, f"{info.value} must be retriable: a retry after a reset succeeds"
        await pool.publisher().send(message)  # the publisher works again
