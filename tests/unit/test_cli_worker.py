"""``kafka-saga worker``: starts on the embedded configuration and drains on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import BrokerConnectionError
from saga.cli.worker import serve
from saga.config import build_manager, load_config
from storage import SqlAlchemySagaStorage

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """``serve`` freezes the heap it set up (saga.heap); the rest of the test run collects as usual."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def start_worker(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "saga.cli", "worker", "--config", "config/default.yml", *extra],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "SAGA_SQLITE_PATH": str(tmp_path / "worker.sqlite3")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(process: subprocess.Popen[str], timeout: float = 30) -> list[str]:
    assert process.stderr is not None
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "kafka-saga worker: ready:" in line:
            return lines
    process.kill()
    pytest.fail("worker did not become ready:\n" + "".join(lines))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_worker_exits_0_on_signal(tmp_path: Path, signum: signal.Signals) -> None:
    process = start_worker(tmp_path)
    try:
        ready = wait_ready(process)
        assert "sagas: demo-order v1; recovery every 1s" in ready[-1]
        started = time.monotonic()
        process.send_signal(signum)
        _, err = process.communicate(timeout=10)
        assert process.returncode == 0, err
        assert time.monotonic() - started < 5
        assert f"{signum.name} received: draining in-flight work" in err
        assert "kafka-saga worker: stopped cleanly" in err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_worker_config_error_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("recovery:\n  interval: fast\n")
    result = subprocess.run(
        [sys.executable, "-m", "saga.cli", "worker", "--config", str(bad)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == f"kafka-saga: {bad}: recovery.interval: expected a number, got 'fast'\n"


async def test_serve_drains_and_returns_0() -> None:
    config = load_config(REPO / "config" / "test.yml")
    manager = build_manager(config)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, manager, stop=stop))
    for _ in range(200):
        if gc.get_freeze_count() > 0:  # ready: the start-up heap is out of the collector's way
            break
        await asyncio.sleep(0.01)
    assert gc.get_freeze_count() > 0
    assert manager.consumer is not None
    assert manager.consumer.concurrency == manager.reply_concurrency
    stop.set()
    assert await asyncio.wait_for(task, 10) == 0
    assert manager.consumer is None


@pytest.mark.parametrize(
    "data",
    [{"recovery": {"enabled": False}, "sagas": ["saga.demo:ORDER_SAGA"]}, {}],
    ids=["disabled", "no sagas"],
)
async def test_serve_without_recovery(data: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(data)
    stop = asyncio.Event()
    stop.set()
    assert await serve(config, build_manager(config), stop=stop) == 0
    assert "; recovery off" in capsys.readouterr().err


async def test_serve_stops_the_storage_when_the_broker_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The schema migration leaves a connection in the engine's pool: a failed setup must not leak it."""
    config = load_config({"storage": {"url": f"sqlite+aiosqlite:///{tmp_path / 'worker.sqlite3'}"}})
    manager = build_manager(config)

    async def refuse() -> None:
        raise BrokerConnectionError("Kafka at 127.0.0.1:1 did not answer")

    monkeypatch.setattr(manager.broker_pool, "start", refuse)
    with pytest.raises(BrokerConnectionError):
        await serve(config, manager, stop=asyncio.Event())
    assert isinstance(manager.storage, SqlAlchemySagaStorage)
    pool = manager.storage.engine.pool
    assert pool.checkedin() == pool.checkedout() == 0
