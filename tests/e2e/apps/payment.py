"""The payment participant: ChargePayment (400 over the limit, 500 on request), RefundPayment to undo it.

``python -m tests.e2e.apps.payment --bootstrap HOST:PORT --database-url URL --suffix S``
"""

from __future__ import annotations

import asyncio
from typing import Any

from saga import CommandContext, SagaBusinessError
from tests.e2e.apps.participant_app import ParticipantApp
from tests.e2e.workload import PAYMENT_LIMIT

SERVICE = "payment"


async def main() -> None:
    app = ParticipantApp.from_args(SERVICE, __doc__ or "", lambda names: names.payment)
    names, participant = app.names, app.participant

    @participant.command(names.charge_payment)
    async def charge_payment(request: CommandContext) -> dict[str, Any]:
        content = request.content
        if content.get("crash"):
            await app.effect(request, "charge_crashed")
            raise RuntimeError("payment gateway crashed")
        if content["amount"] > PAYMENT_LIMIT:
            await app.effect(request, "charge_refused")
            raise SagaBusinessError(f"amount {content['amount']} is over the limit of {PAYMENT_LIMIT}")
        await app.effect(request, "charge")
        return {"charge": f"ch-{content['order']}", "amount": content["amount"]}

    @participant.command(names.refund_payment)
    async def refund_payment(request: CommandContext) -> dict[str, Any]:
        await app.effect(request, "refund")
        return {"refunded": request.content["charge"]}

    await app.serve()


if __name__ == "__main__":
    asyncio.run(main())
