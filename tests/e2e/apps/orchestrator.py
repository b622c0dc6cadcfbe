"""The order orchestrator: a SagaManager on PostgreSQL and Kafka that starts a slice of the workload.

``python -m tests.e2e.apps.orchestrator --bootstrap HOST:PORT --database-url URL --suffix S
--first 0 --count 200 [--concurrency 50] [--go-file PATH]``

It joins the reply consumer group (``READY``), waits for ``--go-file`` to exist when one is given (so that
several orchestrators are all in the group before replies flow), starts orders ``first .. first+count-1``
with ``pause_on_disk=True`` (``STARTED <n> <seconds>``), then keeps consuming replies until SIGTERM.
Replies may land on any orchestrator of the group: executions live in the database, not in a process.
The ``STATS`` line says how many sagas ended in this process and how many of those another one started.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

from saga import Saga, SagaContext, SagaManager, SagaRequest, SagaResponse
from saga.hooks import SagaEvent, SagaHooks
from storage import TERMINAL_STATUSES, SqlAlchemySagaStorage
from tests.e2e.apps import common
from tests.e2e.workload import Names, orders


def order_saga(names: Names) -> Saga:
    """ReserveStock (undo: ReleaseStock), ChargePayment (undo: RefundPayment), then a local confirmation."""

    def reserve_stock(context: SagaContext) -> SagaRequest:
        return SagaRequest(
            names.reserve_stock,
            {"order": context["order"], "sku": context["sku"], "quantity": context["quantity"]},
        )

    def stock_reserved(context: SagaContext, response: SagaResponse) -> SagaContext:
        context["reservation"] = response.content["reservation"]
        return context

    def release_stock(context: SagaContext) -> SagaRequest:
        return SagaRequest(
            names.release_stock, {"order": context["order"], "reservation": context["reservation"]}
        )

    def charge_payment(context: SagaContext) -> SagaRequest:
        return SagaRequest(
            names.charge_payment,
            {"order": context["order"], "amount": context["amount"], "crash": context["crash"]},
        )

    def payment_charged(context: SagaContext, response: SagaResponse) -> SagaContext:
        context["charge"] = response.content["charge"]
        return context

    def refund_payment(context: SagaContext) -> SagaRequest:
        return SagaRequest(names.refund_payment, {"order": context["order"], "charge": context["charge"]})

    def confirm_order(context: SagaContext) -> SagaContext:
        if context["fail_local"]:
            raise RuntimeError(f"order {context['order']} cannot be confirmed")
        context["confirmed"] = True
        return context

    return (
        Saga("order", version=1)
        .remote_step(reserve_stock)
        .on_success(stock_reserved)
        .on_failure(release_stock)
        .remote_step(charge_payment)
        .on_success(payment_charged)
        .on_failure(refund_payment)
        .local_step(confirm_order)
        .commit()
    )


def _exists(path: str) -> bool:
    return os.path.exists(path)


async def main() -> None:
    p = common.parser(__doc__ or "")
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--go-file")
    p.add_argument("--name", default="orchestrator")
    args = p.parse_args()
    common.setup_logging(args.name, args.log_level)
    names = Names(args.suffix)
    storage = SqlAlchemySagaStorage(args.database_url, auto_migrate=False, pool_size=20)
    pool = common.kafka_pool(args.bootstrap, f"{names.orchestrator}-{args.name}")
    started_here: set[uuid.UUID] = set()
    ended_here: set[uuid.UUID] = set()

    def status_changed(event: SagaEvent) -> None:
        if event.status in TERMINAL_STATUSES:
            ended_here.add(event.execution_id)

    manager = SagaManager(
        storage,
        pool,
        service_name=names.orchestrator,
        owner=f"{args.name}:{os.getpid()}",
        hooks=SagaHooks(on_status_changed=status_changed),
    )
    saga = manager.register(order_saga(names))
    stats: dict[str, Any] = {}
    try:
        async with manager:
            common.say("READY")
            if args.go_file:
                while not _exists(args.go_file):  # noqa: ASYNC110 (a file, not an event)
                    await asyncio.sleep(0.05)
            semaphore = asyncio.Semaphore(args.concurrency)

            async def start(order: Any) -> None:
                async with semaphore:
                    execution = await manager.run(
                        saga,
                        order.context(),
                        user="e2e",
                        pause_on_disk=True,
                        raise_on_error=False,
                        idempotency_key=order.idempotency_key,
                    )
                    started_here.add(execution.id)

            batch = orders(args.first + args.count)[args.first :]
            began = time.perf_counter()
            await asyncio.gather(*(start(order) for order in batch))
            stats["start_seconds"] = round(time.perf_counter() - began, 3)
            common.say(f"STARTED {len(batch)} {stats['start_seconds']}")

            def alive() -> bool:
                return manager.consumer is not None and manager.consumer.running

            await common.serve_until_signal(alive)
            # Sagas this process drove to their end, and how many of those another process started.
            stats["ended_here"] = len(ended_here)
            stats["ended_here_started_elsewhere"] = len(ended_here - started_here)
            if manager.consumer is not None:
                stats["consumer"] = dict(manager.consumer.stats)
            if manager.relay is not None:
                stats["relay"] = dict(manager.relay.stats)
    finally:
        common.print_stats(stats)


if __name__ == "__main__":
    asyncio.run(main())
