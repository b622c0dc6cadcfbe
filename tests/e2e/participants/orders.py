"""The sagas and the workload of the participant crash suite.

``order``: ``reserve`` (inventory ReserveStock, compensated by ReleaseStock), ``charge`` (payment Charge,
compensated by Refund), then a local ``confirm`` step that fails for ``LOCAL_FAILURE`` orders. No reply
timeouts: replies are never lost, only late, so every order ends as its outcome says.

``late_order``: its ``reserve`` command goes to the delay topic, from which the suite forwards it to
ReserveStock seconds later; the step times out first and is compensated, so ReleaseStock reaches the
inventory before ReserveStock does. The saga ends ERRORED, and the late forward command must take no
effect that stays (a tombstone refuses it, or its effect is undone).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Any

from saga import RetryPolicy, Saga, SagaContext, SagaRequest, SagaResponse
from tests.e2e.participants.apps import PAYMENT_LIMIT, Topics

#: Seconds a late order's reserve step waits for its reply before it is compensated.
LATE_TIMEOUT = 1.5
#: Seconds the suite holds a late order's forward command before delivering it.
LATE_DELAY = 5.0


class Outcome(enum.Enum):
    GOOD = "good"  # FINISHED: reserve, charge
    REFUSED = "refused"  # ERRORED: reserve, charge refused (400), release
    LOCAL_FAILURE = "local_failure"  # ERRORED: reserve, charge, confirm fails, refund, release
    LATE = "late"  # ERRORED: reserve times out, release first; the late reserve takes no effect


#: The effects each outcome leaves, per (service, effect); a late order may instead reserve and release once.
EXPECTED_EFFECTS: dict[Outcome, dict[tuple[str, str], int]] = {
    Outcome.GOOD: {("inventory", "reserve"): 1, ("payment", "charge"): 1},
    Outcome.REFUSED: {("inventory", "reserve"): 1, ("inventory", "release"): 1},
    Outcome.LOCAL_FAILURE: {
        ("inventory", "reserve"): 1,
        ("inventory", "release"): 1,
        ("payment", "charge"): 1,
        ("payment", "refund"): 1,
    },
    Outcome.LATE: {},
}


@dataclass(frozen=True, slots=True)
class Order:
    number: int
    outcome: Outcome
    slow: float

    @property
    def idempotency_key(self) -> str:
        return f"participant-crash-order-{self.number}"

    @property
    def saga(self) -> str:
        return "late_order" if self.outcome is Outcome.LATE else "order"

    def context(self) -> dict[str, Any]:
        return {
            "order": self.number,
            "amount": PAYMENT_LIMIT + 1 if self.outcome is Outcome.REFUSED else 10 + self.number % 500,
            "fail_local": self.outcome is Outcome.LOCAL_FAILURE,
            "slow": self.slow,
        }


def workload(count: int, seed: int, slow: float) -> list[Order]:
    """``count`` orders: 70 % good, 10 % of each failure, one in eight with slow handlers."""
    rng = random.Random(seed)
    outcomes = [Outcome.GOOD] * 7 + [Outcome.REFUSED, Outcome.LOCAL_FAILURE, Outcome.LATE]
    return [Order(n, rng.choice(outcomes), slow if rng.random() < 0.125 else 0.0) for n in range(count)]


def sagas(names: Topics) -> list[Saga]:
    def reserve(context: SagaContext) -> SagaRequest:
        return SagaRequest(names.reserve, {"order": context["order"], "slow": context["slow"]})

    def reserve_late(context: SagaContext) -> SagaRequest:
        return SagaRequest(names.reserve_late, {"order": context["order"]})

    def reserved(context: SagaContext, response: SagaResponse) -> SagaContext:
        context["reservation"] = response.content["reservation"]
        return context

    def release(context: SagaContext) -> SagaRequest:
        return SagaRequest(names.release, {"order": context["order"]})

    def charge(context: SagaContext) -> SagaRequest:
        return SagaRequest(
            names.charge, {"order": context["order"], "amount": context["amount"], "slow": context["slow"]}
        )

    def charged(context: SagaContext, response: SagaResponse) -> SagaContext:
        context["charge"] = response.content["charge"]
        return context

    def refund(context: SagaContext) -> SagaRequest:
        return SagaRequest(names.refund, {"order": context["order"]})

    def confirm(context: SagaContext) -> None:
        if context["fail_local"]:
            raise RuntimeError(f"order {context['order']} cannot be confirmed")

    order = (
        Saga("order", version=1)
        .remote_step(reserve, name="reserve")
        .on_success(reserved)
        .on_failure(release)
        .remote_step(charge, name="charge")
        .on_success(charged)
        .on_failure(refund)
        .local_step(confirm)
        .commit()
    )
    late = (
        Saga("late_order", version=1)
        .remote_step(
            reserve_late,
            name="reserve",
            timeout=LATE_TIMEOUT,
            # The compensation waits as long as the step, then is replayed (answered from the store when
            # the participant handled it meanwhile) until its reply comes.
            compensation_retry=RetryPolicy(max_attempts=1000, initial_delay=0.2, max_delay=2.0),
        )
        .on_success(reserved)
        .on_failure(release)
        .remote_step(charge, name="charge")
        .on_success(charged)
        .on_failure(refund)
        .commit()
    )
    return [order, late]
