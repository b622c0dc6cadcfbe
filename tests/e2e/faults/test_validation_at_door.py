"""Bad values are refused where they enter, naming the key, and nothing behind them is blocked.

* ``kafka-saga worker`` (an OS process) with a non-finite or oversized number in its configuration exits
  2 naming the key, before it creates a table or a topic;
* against the real Kafka and PostgreSQL, with the inventory participant as its own process, ``run()``
  refuses a context nested 300 deep, a lone surrogate, ``Decimal('NaN')`` and ``2**70`` with
  `SagaContextError` naming the key, and a ``user`` that is neither a string nor a UUID, storing nothing;
  ``user=uuid.UUID(...)`` is stored as its string, and its saga and the sagas started after it finish.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from broker import KafkaBrokerPool
from saga import SagaContextError, SagaManager
from storage import SagaStatus, SqlAlchemySagaStorage
from tests.e2e import db
from tests.e2e.conftest import Apps
from tests.e2e.faults import _stock
from tests.e2e.workload import Names

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]

BAD_CONFIGS = [
    ("timeouts", "default_reply_seconds", float("inf")),
    ("timeouts", "default_reply_seconds", 1e12),
    ("recovery", "interval", float("nan")),
    ("recovery", "lease_seconds", float("inf")),
    ("outbox", "relay_interval", float("inf")),
]


async def _tables(url: str) -> list[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
            )
            return [row[0] for row in rows]
    finally:
        await engine.dispose()


async def test_bad_numbers_in_the_configuration_exit_2_naming_the_key(
    kafka_bootstrap: str, e2e_database: str, tmp_path: Path
) -> None:
    names = Names(uuid.uuid4().hex[:10])
    for section, key, value in BAD_CONFIGS:
        config = _stock.write_config(
            tmp_path / f"{section}-{key}.yml",
            names=names,
            bootstrap=kafka_bootstrap,
            database_url=e2e_database,
            sagas=["tests.e2e.faults._stock:V1"],
            **{section: {key: value}},
        )
        done = _stock.run_cli(names, "worker", "--config", str(config), timeout=60)
        assert done.returncode == 2, (section, key, done.stderr)
        assert f"{section}.{key}:" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert await _tables(e2e_database) == []  # nothing was created


@pytest.fixture
async def manager(
    kafka_bootstrap: str, e2e_database: str, apps: Apps
) -> AsyncIterator[tuple[SagaManager, Names]]:
    names = Names(uuid.uuid4().hex[:10])
    engine = create_async_engine(e2e_database)
    storage = SqlAlchemySagaStorage(e2e_database, auto_migrate=True)
    await storage.start()
    await db.create_tables(engine)
    inventory = apps.start(
        "inventory",
        "inventory",
        *["--bootstrap", kafka_bootstrap, "--database-url", e2e_database, "--suffix", names.suffix],
    )
    await apps.wait_ready(inventory)
    manager = SagaManager(
        storage, KafkaBrokerPool(bootstrap_servers=kafka_bootstrap), service_name=names.orchestrator
    )
    try:
        async with manager:
            yield manager, names
    finally:
        apps.stop_all()
        await engine.dispose()


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"down": value}
    return value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (_nested(300), "nested deeper than"),
        ("caf\udce9", "lone surrogate"),
        (Decimal("NaN"), "not a finite number"),
        (2**70, "64 bits"),
    ],
    ids=["nested-300", "lone-surrogate", "decimal-nan", "int-2**70"],
)
async def test_unstorable_context_is_refused_before_anything_is_stored(
    manager: tuple[SagaManager, Names], value: Any, reason: str
) -> None:
    orchestrator, names = manager
    saga = _stock.stock_saga(names, 1, timeout=30)
    with pytest.raises(SagaContextError, match=reason) as caught:
        await orchestrator.run(saga, {"order": 1, "extra": value})
    assert caught.value.key == "extra"
    assert (await orchestrator.storage.query()).total == 0
    # The next saga is not blocked by anything the refused one left behind.
    assert (await orchestrator.run(saga, {"order": 2})).status is SagaStatus.FINISHED


async def test_user_is_a_string_or_a_uuid(manager: tuple[SagaManager, Names]) -> None:
    orchestrator, names = manager
    saga = _stock.stock_saga(names, 1, timeout=30)
    with pytest.raises(TypeError, match=r"user must be a str or a uuid\.UUID"):
        await orchestrator.run(saga, {"order": 1}, user=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="user is not valid UTF-8"):
        await orchestrator.run(saga, {"order": 1}, user="caf\udce9")
    assert (await orchestrator.storage.query()).total == 0
    user = uuid.uuid4()
    first = await orchestrator.run(saga, {"order": 3}, user=user, pause_on_disk=True)
    after = [await orchestrator.run(saga, {"order": n}, pause_on_disk=True) for n in (4, 5)]
    ids = [first.id, *(e.id for e in after)]

    async def finished() -> bool:
        statuses = [(await orchestrator.storage.load(i)).status for i in ids]
        return statuses == [SagaStatus.FINISHED] * len(ids)

    await _stock.eventually(finished, within=60, what="the saga with a UUID user and those after it")
    assert (await orchestrator.storage.load(first.id)).user == str(user)
