"""The inventory participant: ReserveStock, and ReleaseStock as its compensation.

``python -m tests.e2e.apps.inventory --bootstrap HOST:PORT --database-url URL --suffix S``
"""

from __future__ import annotations

import asyncio
from typing import Any

from saga import CommandContext
from tests.e2e.apps.participant_app import ParticipantApp

SERVICE = "inventory"


async def main() -> None:
    app = ParticipantApp.from_args(SERVICE, __doc__ or "", lambda names: names.inventory)
    names, participant = app.names, app.participant

    @participant.command(names.reserve_stock)
    async def reserve_stock(request: CommandContext) -> dict[str, Any]:
        await app.effect(request, "reserve")
        return {"reservation": f"res-{request.content['order']}", "quantity": request.content["quantity"]}

    @participant.command(names.release_stock)
    async def release_stock(request: CommandContext) -> dict[str, Any]:
        await app.effect(request, "release")
        return {"released": request.content["reservation"]}

    await app.serve()


if __name__ == "__main__":
    asyncio.run(main())
