"""How fast the console's list page answers with a million executions stored (figures: bench/README.md).

``python bench/console_list.py [--rows 1000000] [--requests 30] [--keep]``

Creates a database of its own on the benchmark PostgreSQL (``SAGA_DATABASE_URL``'s server, else
127.0.0.1:15432), migrates it, loads ``--rows`` executions with COPY (mostly finished, some errored,
dead-lettered, paused and overdue, over 30 days), starts ``kafka-saga ui`` on it as a separate process and
times HTTP GETs of the list page: first page, a page deep in the list (keyset cursor), and each filter.
Prints one Markdown table (median and 95th percentile of ``--requests`` requests each). Drops the database
afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import asyncpg  # type: ignore[import-untyped]
import orjson
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from saga.ui.filters import cursor_of  # noqa: E402
from storage import ExecutionRecord, SagaStatus  # noqa: E402
from storage.migrate import upgrade  # noqa: E402

STATE = orjson.dumps({"v": 1, "ctx": {"order": "o"}, "cur": [3], "ph": "execute"})
STEPS = orjson.dumps([]).decode()


def _status(n: int) -> str:
    r = n % 100
    if r < 93:
        return "finished"
    if r < 96:
        return "errored"
    if r < 97:
        return "dead_letter"
    if r < 99:
        return "paused"
    return "failed"


def _rows(first: int, count: int, now: datetime) -> list[tuple[object, ...]]:
    rng = random.Random(7)
    rows = []
    span = timedelta(days=30).total_seconds()
    for n in range(first, first + count):
        status = _status(n)
        created = now - timedelta(seconds=rng.random() * span)
        error = None
        if status in ("errored", "dead_letter", "failed"):
            kind = ("card declined", "stock exhausted", "no reply before the step's timeout")[n % 3]
            error = orjson.dumps({"step": "charge", "error": kind, "type": "reply"}).decode()
        deadline = None
        if status == "paused":
            deadline = created + timedelta(seconds=30) if n % 2 else now + timedelta(hours=1)
        rows.append(
            (
                uuid.uuid4(),
                ("order", "refund", "shipping")[n % 3],
                1 + (n % 7 == 0),
                status,
                STATE,
                STEPS,
                3,
                n % 5 if status == "dead_letter" else 0,
                f"key-{n}",
                None,
                deadline,
                None,
                None,
                error,
                created,
                created + timedelta(seconds=1),
            )
        )
    return rows


async def load(url: str, count: int) -> None:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        now = datetime.now(UTC)
        columns = [
            "id",
            "name",
            "definition_version",
            "status",
            "state",
            "steps",
            "version",
            "recovery_attempts",
            "idempotency_key",
            "user_name",
            "reply_deadline",
            "owner",
            "lease_until",
            "error",
            "created_at",
            "updated_at",
        ]
        batch = 100_000
        for start in range(0, count, batch):
            rows = _rows(start, min(batch, count - start), now)
            await conn.copy_records_to_table("saga_executions", records=rows, columns=columns)
        await conn.execute("ANALYZE saga_executions")
    finally:
        await conn.close()


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _middle_cursor(url: str, count: int) -> str:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        row = await conn.fetchrow(
            "SELECT id, created_at FROM saga_executions ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT 1",
            count // 2,
        )
    finally:
        await conn.close()
    record = ExecutionRecord(
        id=row["id"],
        name="x",
        definition_version=1,
        status=SagaStatus.FINISHED,
        state=b"",
        created_at=row["created_at"],
    )
    return cursor_of(record)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _time(url: str, requests: int) -> tuple[float, float]:
    took = []
    for _ in range(requests + 2):
        start = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
        took.append((time.perf_counter() - start) * 1000)
    took = took[2:]  # the first two warm the connection pool and the plans
    took.sort()
    return statistics.median(took), took[int(len(took) * 0.95) - 1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    base = os.environ.get("SAGA_DATABASE_URL", "postgresql+asyncpg://saga:saga@127.0.0.1:15432/saga_test")
    name = f"bench_console_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(base, f'CREATE DATABASE "{name}"'))
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    process = None
    try:
        upgrade(url)
        started = time.perf_counter()
        asyncio.run(load(url, args.rows))
        print(f"loaded {args.rows:,} executions in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        cursor = asyncio.run(_middle_cursor(url, args.rows))
        config = Path(tempfile.mkdtemp()) / "saga.yml"
        config.write_text(f'storage: {{url: "{url}", auto_migrate: false}}\nlogging: {{level: WARNING}}\n')
        port = _free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "saga.cli", "ui", "--config", str(config), "--port", str(port)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        root = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(root + "/api/counts", timeout=30).read()
                break
            except OSError:
                time.sleep(0.1)
        cases = [
            ("first page, no filter", "/"),
            ("page at the middle (keyset cursor)", f"/?after={cursor}"),
            ("status=dead_letter", "/?status=dead_letter"),
            ("status=paused + overdue", "/?status=paused&overdue=1"),
            ("saga=refund, version=2", "/?saga=refund&version=2"),
            ("idempotency key", "/?key=key-123456"),
            (
                "created in one day",
                "/?since="
                + quote((datetime.now(UTC) - timedelta(days=3)).isoformat()[:16])
                + "&until="
                + quote((datetime.now(UTC) - timedelta(days=2)).isoformat()[:16]),
            ),
            ("error contains 'stock'", "/?error=stock"),
            ("live counts (/api/counts, every 5 s)", "/api/counts"),
        ]
        print(f"| request ({args.rows:,} executions) | median ms | p95 ms |")
        print("|---|---:|---:|")
        for label, path in cases:
            median, p95 = _time(root + path, args.requests)
            print(f"| {label} | {median:.1f} | {p95:.1f} |", flush=True)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=15)
        if not args.keep:
            asyncio.run(_admin(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return 0


if __name__ == "__main__":
    sys.exit(main())
