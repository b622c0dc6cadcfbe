"""An idempotency key names one start of one saga: reusing it for another saga raises, naming both.

Against the real PostgreSQL and Kafka, from two orchestrator processes sharing the database: ORDER with
key "42" runs; a REFUND started with key "42" must raise `DuplicateIdempotencyKeyError` naming both sagas
(not return the ORDER execution, which would silently drop the refund), and a second ORDER start with
the key still returns the first execution.
"""

from __future__ import annotations

import uuid

import pytest

from broker import KafkaBrokerPool
from saga import Saga, SagaContext, SagaManager
from storage import DuplicateIdempotencyKeyError, SagaStatus, SqlAlchemySagaStorage

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]


def local_saga(name: str) -> Saga:
    def mark(context: SagaContext) -> SagaContext:
        context["ran"] = name
        return context

    return Saga(name).local_step(mark, name="mark").commit()


async def test_a_key_reused_by_another_saga_raises_naming_both(
    kafka_bootstrap: str, e2e_database: str
) -> None:
    suffix = uuid.uuid4().hex[:8]
    order, refund = local_saga(f"order{suffix}"), local_saga(f"refund{suffix}")
    managers = []
    for owner in ("a", "b"):  # two orchestrators on one database, as two services would be
        manager = SagaManager(
            SqlAlchemySagaStorage(e2e_database, auto_migrate=True),
            KafkaBrokerPool(bootstrap_servers=kafka_bootstrap),
            service_name=f"idem{suffix}{owner}",
            owner=owner,
        )
        manager.register(order)  # both services know both sagas, as in one orchestrator
        manager.register(refund)
        await manager.setup()
        managers.append(manager)
    a, b = managers
    try:
        first = await a.run(order, {"n": 1}, idempotency_key="42")
        assert first.status is SagaStatus.FINISHED
        with pytest.raises(DuplicateIdempotencyKeyError) as caught:
            await b.run(refund, {"n": 1}, idempotency_key="42")
        assert caught.value.existing_id == first.id
        assert (caught.value.existing_saga, caught.value.saga) == (order.name, refund.name)
        assert repr(order.name) in str(caught.value) and repr(refund.name) in str(caught.value)
        again = await b.run(order, {"n": 2}, idempotency_key="42")
        assert again.id == first.id and again.context["n"] == 1
        other = await b.run(refund, {"n": 3}, idempotency_key=f"refund-{suffix}-42")
        assert other.status is SagaStatus.FINISHED and other.context["ran"] == refund.name
        rows = (await a.storage.query()).rows
        assert sorted(r.name for r in rows) == sorted([order.name, refund.name])
    finally:
        for manager in managers:
            await manager.destroy()
