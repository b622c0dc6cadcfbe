"""The inventory participant: ReserveStock, and ReleaseStock as its compensation.

``python -m tests.e2e.apps.inventory --bootstrap HOST:PORT --database-url URL --suffix S``
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine

from saga import CommandContext, SagaParticipant
from saga.messages import SagaControl
from storage import SqlAlchemySagaStorage
from tests.e2e import db
from tests.e2e.apps import common
from tests.e2e.workload import Names

SERVICE = "inventory"


async def main() -> None:
    args = common.parser(__doc__ or "").parse_args()
    common.setup_logging(SERVICE, args.log_level)
    names = Names(args.suffix)
    engine = create_async_engine(args.database_url, pool_size=10)
    storage = SqlAlchemySagaStorage(args.database_url, auto_migrate=False)
    pool = common.kafka_pool(args.bootstrap, names.inventory)
    participant = SagaParticipant(names.inventory, pool, storage=storage)

    async def effect(request: CommandContext, name: str) -> None:
        await db.record_effect(
            engine,
            SERVICE,
            idempotency_key=request.idempotency_key,
            execution_id=request.execution_id,
            order=request.content["order"],
            effect=name,
        )

    @participant.command(names.reserve_stock)
    async def reserve_stock(request: CommandContext) -> dict[str, Any]:
        await effect(request, "reserve")
        return {"reservation": f"res-{request.content['order']}", "quantity": request.content["quantity"]}

    @participant.command(names.release_stock)
    async def release_stock(request: CommandContext) -> dict[str, Any]:
        await effect(request, "release")
        return {"released": request.content["reservation"]}

    async def decision(control: SagaControl) -> None:
        await db.record_decision(engine, SERVICE, execution_id=control.execution_id, action=control.action)

    participant.on_commit(decision)
    participant.on_reject(decision)

    try:
        async with pool, storage, participant:
            common.say("READY")
            await common.serve_until_signal(lambda: participant.running)
    finally:
        common.print_stats(dataclasses.asdict(participant.stats))
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
