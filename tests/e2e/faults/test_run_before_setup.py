"""``run()`` on a manager that is not set up raises `SagaStateError` at once and stores nothing.

With the real Kafka pool and PostgreSQL storage, both not started: neither ``pause_on_disk=True`` (which
returned PAUSED and left a saga to time out later) nor ``pause_on_disk=False`` (which waited forever)
may get past the door. The ``wait_for`` only keeps a regression from hanging the suite.
"""

from __future__ import annotations

import asyncio

import pytest

from broker import KafkaBrokerPool
from saga import Saga, SagaContext, SagaManager, SagaRequest, SagaStateError
from storage import SqlAlchemySagaStorage

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]


def remote_saga() -> Saga:
    def reserve(context: SagaContext) -> SagaRequest:
        return SagaRequest("ReserveStockNobodyServes", {"n": context["n"]})

    return Saga("before_setup").remote_step(reserve, name="reserve", timeout=5).commit()


@pytest.mark.parametrize("pause_on_disk", [True, False])
async def test_run_before_setup_raises_at_once(
    kafka_bootstrap: str, e2e_database: str, pause_on_disk: bool
) -> None:
    storage = SqlAlchemySagaStorage(e2e_database, auto_migrate=True)
    manager = SagaManager(storage, KafkaBrokerPool(bootstrap_servers=kafka_bootstrap))
    with pytest.raises(SagaStateError, match="not set up"):
        await asyncio.wait_for(manager.run(remote_saga(), {"n": 1}, pause_on_disk=pause_on_disk), 30)
    await storage.start()
    try:
        assert (await storage.query()).total == 0  # nothing stored that could time out later
    finally:
        await storage.stop()
    # Once set up, the same manager runs (and pauses on) the same saga.
    async with manager:
        paused = await manager.run(remote_saga(), {"n": 2}, pause_on_disk=True)
        assert paused.awaiting is not None
