"""The inventory or payment participant of the reliability suites.

``python -m tests.e2e.chaos.participant --service inventory|payment --bootstrap HOST:PORT
--database-url URL --suffix S``

Same commands and effects as `tests.e2e.apps.inventory` / `tests.e2e.apps.payment`, with one difference:
effect and decision rows are written durably (`tests.e2e.chaos.common.record_effect`), so a PostgreSQL
restart in the middle of a handler delays the reply instead of turning it into a 500 (which would compensate
a saga that should have finished). Its dedup store is the `SqlAlchemySagaStorage`, as in production.
Prints ``READY``, runs until SIGTERM, prints ``STATS {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
from typing import Any

import orjson

from saga import CommandContext, SagaBusinessError, SagaParticipant
from saga.messages import SagaControl
from storage import SqlAlchemySagaStorage
from tests.e2e.chaos import common
from tests.e2e.workload import PAYMENT_LIMIT, Names


def register(participant: SagaParticipant, service: str, names: Names, eng: Any) -> None:
    async def effect(request: CommandContext, name: str) -> None:
        await common.record_effect(
            eng,
            service,
            idempotency_key=request.idempotency_key,
            execution_id=request.execution_id,
            order=request.content["order"],
            effect=name,
        )

    if service == "inventory":

        @participant.command(names.reserve_stock)
        async def reserve_stock(request: CommandContext) -> dict[str, Any]:
            await effect(request, "reserve")
            return {"reservation": f"res-{request.content['order']}", "quantity": request.content["quantity"]}

        @participant.command(names.release_stock)
        async def release_stock(request: CommandContext) -> dict[str, Any]:
            await effect(request, "release")
            return {"released": request.content["reservation"]}

    else:

        @participant.command(names.charge_payment)
        async def charge_payment(request: CommandContext) -> dict[str, Any]:
            content = request.content
            if content.get("crash"):
                await effect(request, "charge_crashed")
                raise RuntimeError("payment gateway crashed")
            if content["amount"] > PAYMENT_LIMIT:
                await effect(request, "charge_refused")
                raise SagaBusinessError(f"amount {content['amount']} is over the limit of {PAYMENT_LIMIT}")
            await effect(request, "charge")
            return {"charge": f"ch-{content['order']}", "amount": content["amount"]}

        @participant.command(names.refund_payment)
        async def refund_payment(request: CommandContext) -> dict[str, Any]:
            await effect(request, "refund")
            return {"refunded": request.content["charge"]}

    async def decision(control: SagaControl) -> None:
        await common.record_decision(eng, service, execution_id=control.execution_id, action=control.action)

    participant.on_commit(decision)
    participant.on_reject(decision)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--service", choices=("inventory", "payment"), required=True)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--database-url", required=True)
    p.add_argument("--suffix", required=True)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args()
    common.setup_logging(args.service, args.log_level)
    names = Names(args.suffix)
    service_name = names.inventory if args.service == "inventory" else names.payment
    eng = common.engine(args.database_url, 10)
    storage = SqlAlchemySagaStorage(args.database_url, auto_migrate=False)
    pool = common.kafka_pool(args.bootstrap, service_name)
    participant = SagaParticipant(service_name, pool, storage=storage)
    register(participant, args.service, names, eng)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with pool, storage, participant:
            common.say("READY")
            while not stop.is_set() and participant.running:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
            if not participant.running:
                raise SystemExit(3)  # the consumer died: the test reports it
    finally:
        common.say("STATS " + orjson.dumps(dataclasses.asdict(participant.stats)).decode())
        await eng.dispose()


if __name__ == "__main__":
    asyncio.run(main())
