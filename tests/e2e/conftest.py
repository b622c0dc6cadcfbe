"""Fixtures of the end-to-end tests: a fresh database per test and the app processes it runs.

Each test gets its own PostgreSQL database (created here, dropped with ``FORCE`` afterwards) and its own
topic names (a random suffix), so runs never see each other's rows or records. App processes write stdout
and stderr to files (no pipe can fill up and block them) and are ended by pid in teardown: SIGTERM, then
SIGKILL for any that did not exit in time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class App:
    """One app process and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr_tail(self, lines: int = 40) -> str:
        text = self.stderr_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stats(self) -> str | None:
        """The ``STATS`` line the app prints when it exits."""
        for line in self.stdout().splitlines():
            if line.startswith("STATS "):
                return line.removeprefix("STATS ")
        return None


class Apps:
    """Starts app processes (``python -m tests.e2e.apps.<module>``) and ends them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.apps: list[App] = []

    def start(self, name: str, module: str, *args: str) -> App:
        stdout_path = self.directory / f"{name}.stdout"
        stderr_path = self.directory / f"{name}.stderr"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", f"tests.e2e.apps.{module}", *args],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        app = App(name, process, stdout_path, stderr_path)
        self.apps.append(app)
        return app

    async def wait_ready(self, *apps: App, within: float = 60.0) -> None:
        """Wait until every app printed ``READY``; fail with its stderr if one exits or is late."""
        deadline = time.monotonic() + within
        pending = list(apps)
        while pending:
            for app in list(pending):
                if "READY" in app.stdout().splitlines():
                    pending.remove(app)
                elif app.process.poll() is not None:
                    pytest.fail(
                        f"{app.name} exited with {app.process.returncode} before READY\n{self.report()}"
                    )
            if pending and time.monotonic() > deadline:
                pytest.fail(f"{[a.name for a in pending]} not READY after {within} s\n{self.report()}")
            await asyncio.sleep(0.1)

    def check_alive(self) -> None:
        """Fail, showing every app's stderr, if any app process has exited."""
        dead = [app for app in self.apps if app.process.poll() is not None]
        if dead:
            names = ", ".join(f"{app.name} (exit {app.process.returncode})" for app in dead)
            pytest.fail(f"app process ended early: {names}\n{self.report()}")

    def report(self, lines: int = 40) -> str:
        """Every app's status and the tail of its stderr, for assertion messages."""
        parts = []
        for app in self.apps:
            code = app.process.poll()
            state = "running" if code is None else f"exit {code}"
            parts.append(
                f"----- {app.name} (pid {app.pid}, {state}) stderr tail -----\n{app.stderr_tail(lines)}"
            )
        return "\n".join(parts)

    def stop(self, app: App, *, grace: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit code."""
        if app.process.poll() is None:
            app.process.send_signal(signal.SIGTERM)
            try:
                app.process.wait(grace)
            except subprocess.TimeoutExpired:
                app.process.kill()
                app.process.wait(5)
        return app.process.returncode

    def stop_all(self) -> None:
        for app in self.apps:  # signal all first, so they shut down in parallel
            if app.process.poll() is None:
                app.process.send_signal(signal.SIGTERM)
        for app in self.apps:
            self.stop(app)


async def _admin(database_url: str, statement: str) -> None:
    engine = create_async_engine(database_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture
async def e2e_database(database_url: str) -> AsyncIterator[str]:
    """URL of a database created for this test alone, dropped afterwards (``WITH (FORCE)``)."""
    name = f"e2e_{uuid.uuid4().hex[:16]}"
    await _admin(database_url, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        if os.environ.get("E2E_KEEP_DATABASE") == "1":  # for a post-mortem: psql ... -d <name>
            print(f"\nE2E_KEEP_DATABASE=1: kept database {name}")
        else:
            await _admin(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def apps(e2e_database: str, tmp_path: Path) -> Iterator[Apps]:
    """The test's app processes; all ended (by pid) before its database is dropped."""
    apps = Apps(tmp_path)
    try:
        yield apps
    finally:
        apps.stop_all()
