"""What the definition-version, validation and cluster fault tests share: a stock saga and its processes.

The saga reserves stock at the e2e inventory participant (``tests.e2e.apps.inventory``), whose effect table
has no unique constraint, then confirms locally. ``V1`` and ``V2`` are two versions of it, built at import
from ``KAFKA_SAGA_FAULTS_SUFFIX`` so that a ``kafka-saga worker`` configuration can list them
(``sagas: [tests.e2e.faults._stock:V2]``) and every run keeps its own topic names.

Orchestrator processes here are the real ``kafka-saga worker`` command, started with the repository on
``PYTHONPATH`` and ended by pid through the ``apps`` fixture.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from saga import Saga, SagaContext, SagaRequest, SagaResponse
from tests.e2e.conftest import REPO_ROOT, App, Apps
from tests.e2e.workload import Names

SUFFIX_ENV = "KAFKA_SAGA_FAULTS_SUFFIX"


def stock_saga(names: Names, version: int, *, timeout: float | None = None) -> Saga:
    """ReserveStock (undo: ReleaseStock), then a local step recording which version confirmed."""

    def reserve(context: SagaContext) -> SagaRequest:
        return SagaRequest(
            names.reserve_stock,
            {"order": context["order"], "sku": "sku", "quantity": context.get("quantity", 1)},
        )

    def reserved(context: SagaContext, response: SagaResponse) -> SagaContext:
        context["reservation"] = response.content["reservation"]
        return context

    def release(context: SagaContext) -> SagaRequest:
        return SagaRequest(
            names.release_stock, {"order": context["order"], "reservation": context.get("reservation")}
        )

    def confirm(context: SagaContext) -> SagaContext:
        context["confirmed_by"] = version
        return context

    return (
        Saga(f"stock{names.suffix}", version=version)
        .remote_step(reserve, name="reserve", timeout=timeout)
        .on_success(reserved)
        .on_failure(release)
        .local_step(confirm, name="confirm")
        .commit()
    )


_names = Names(os.environ.get(SUFFIX_ENV, "unset"))
#: Version 1, waiting at most 3 s for the reserve reply.
V1 = stock_saga(_names, 1, timeout=3.0)
#: Version 2 (same steps; what matters is the version number).
V2 = stock_saga(_names, 2, timeout=3.0)
#: The cluster tests' saga: a reply timeout longer than a leader election.
PATIENT = stock_saga(_names, 1, timeout=30.0)


def write_config(
    path: Path,
    *,
    names: Names,
    bootstrap: str,
    database_url: str,
    sagas: list[str],
    kafka: Mapping[str, Any] | None = None,
    **sections: Any,
) -> Path:
    """A ``kafka-saga`` configuration file for this run's orchestrator service."""
    config: dict[str, Any] = {
        "service": {"name": names.orchestrator},
        "broker": {
            "type": "kafka",
            "kafka": {"bootstrap_servers": bootstrap, "topic_partitions": 4, **(kafka or {})},
        },
        "storage": {"url": database_url, "auto_migrate": True},
        "sagas": sagas,
        "recovery": {"interval": 0.5, "lease_seconds": 5, "max_recovery_attempts": 2},
        "logging": {"level": "INFO"},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path.write_text(yaml.safe_dump(config))
    return path


def cli_env(names: Names) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        SUFFIX_ENV: names.suffix,
        "PYTHONUNBUFFERED": "1",
    }


def start_worker(apps: Apps, name: str, config: Path, names: Names) -> App:
    """``kafka-saga worker --config CONFIG`` as an OS process the ``apps`` fixture ends."""
    return start_module(apps, name, names, "saga.cli", "worker", "--config", str(config))


def start_module(apps: Apps, name: str, names: Names, module: str, *args: str) -> App:
    """``python -m MODULE ARGS`` as an OS process the ``apps`` fixture ends."""
    stdout_path = apps.directory / f"{name}.stdout"
    stderr_path = apps.directory / f"{name}.stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=cli_env(names),
        )
    app = App(name, process, stdout_path, stderr_path)
    apps.apps.append(app)
    return app


async def wait_worker_ready(apps: Apps, app: App, *, within: float = 90.0) -> None:
    """Until the worker says ``ready`` on stderr; fail with its output if it exits first."""
    deadline = time.monotonic() + within
    while "kafka-saga worker: ready" not in app.stderr_path.read_text(errors="replace"):
        if app.process.poll() is not None:
            pytest.fail(f"{app.name} exited with {app.process.returncode} before ready\n{apps.report()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{app.name} not ready after {within} s\n{apps.report()}")
        await asyncio.sleep(0.2)


def run_cli(names: Names, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One ``kafka-saga`` command as an OS process."""
    return subprocess.run(
        [sys.executable, "-m", "saga.cli", *args],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(names),
        check=False,
    )


async def eventually(predicate: Any, *, within: float, what: str, report: Any = None) -> None:
    """Until the async ``predicate()`` holds; fail naming ``what`` (and ``report()``) if it never does."""
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            detail = "" if report is None else f"\n{report()}"
            pytest.fail(f"{what} did not happen within {within} s{detail}")
        await asyncio.sleep(0.2)


async def effect_counts(engine: AsyncEngine) -> dict[tuple[uuid.UUID, str], int]:
    """Inventory effects per execution and effect, counted in a table without unique constraints."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT execution_id, effect, count(*) FROM inventory_effects GROUP BY 1, 2")
        )
        return {(execution_id, effect): count for execution_id, effect, count in rows}


async def decision_counts(engine: AsyncEngine) -> dict[tuple[uuid.UUID, str], int]:
    """Commit/reject decisions the inventory received, per execution and action."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT execution_id, action, count(*) FROM inventory_decisions GROUP BY 1, 2")
        )
        return {(execution_id, action): count for execution_id, action, count in rows}
