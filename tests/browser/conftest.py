"""Fixtures of the browser tests: a seeded PostgreSQL database, ``kafka-saga ui`` processes, Chromium.

Chromium is Debian's (``scripts/tools/browser.sh`` installs it when missing), driven by Playwright through
its executable path: Playwright's own browser builds are never downloaded. Screenshots go to
``tests/browser/artifacts/`` (git-ignored), kept after the run for a person to look at.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from tests.browser.seed import Seeded, seed

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TOKEN = "s3cret-console-token"


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        result = subprocess.run(
            ["bash", str(REPO / "scripts" / "tools" / "browser.sh")],
            capture_output=True,
            text=True,
            check=False,
        )
        found = result.stdout.strip().splitlines()[-1] if result.returncode == 0 and result.stdout else None
    if not found:
        pytest.fail("Chromium is missing and scripts/tools/browser.sh could not install it")
    return found


async def _admin(database_url: str, statement: str) -> None:
    engine = create_async_engine(database_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


@dataclass
class Console:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class World:
    database_url: str
    seeded: Seeded
    config: Path


def _run(coroutine: Any) -> Any:
    """Run ``coroutine`` on a loop of its own thread: Playwright's sync API keeps a loop in this one."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@pytest.fixture(scope="module")
def world(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    name = f"browser_{uuid.uuid4().hex[:12]}"
    _run(_admin(database_url, f'CREATE DATABASE "{name}"'))
    url = make_url(database_url).set(database=name).render_as_string(hide_password=False)
    try:
        seeded = _run(seed(url))
        config = tmp_path_factory.mktemp("console") / "saga.yml"
        config.write_text(
            f"""
service: {{name: browser}}
storage: {{url: "{url}"}}
sagas: ["tests.browser.seed:SHOP", "tests.browser.seed:HOLD", "tests.browser.seed:FRAGILE"]
ui: {{page_size: 4}}
logging: {{level: INFO, format: json}}
"""
        )
        yield World(url, seeded, config)
    finally:
        _run(_admin(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_console(config: Path, log: Path, *extra: str) -> Console:
    port = _free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "saga.cli", "ui", "--config", str(config), "--port", str(port), *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/api/counts", timeout=2):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"kafka-saga ui did not come up:\n{log.read_text(errors='replace')}"
                ) from None
            time.sleep(0.1)
    return Console(url, process, log)


def _stop(console: Console) -> None:
    console.process.terminate()
    try:
        console.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        console.process.kill()
        console.process.wait()


@pytest.fixture(scope="module")
def console(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """The console with actions enabled by `TOKEN`."""
    running = start_console(world.config, tmp_path_factory.mktemp("ui") / "ui.log", "--token", TOKEN)
    yield running
    _stop(running)


@pytest.fixture(scope="module")
def read_only_console(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """The console started without a token."""
    running = start_console(world.config, tmp_path_factory.mktemp("ui-ro") / "ui.log")
    yield running
    _stop(running)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    yield tab
    context.close()


def screenshot(page: Any, name: str, *, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path
