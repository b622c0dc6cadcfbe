"""The e2e workload: which orders run, what each should end as, and the topic names of one test run.

Shared by the test (expectations) and the apps (behaviour), so both read the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from storage import SagaStatus

#: Payment refuses (400) a charge above this amount.
PAYMENT_LIMIT = 1_000


class Outcome(StrEnum):
    """How an order's saga goes."""

    GOOD = "good"  # reserve, charge, confirm: FINISHED
    REFUSED = "refused"  # payment replies 400 (amount over the limit): release stock, ERRORED
    CRASHED = "crashed"  # payment replies 500 (flag in the content): release stock, ERRORED
    LOCAL_FAILURE = "local_failure"  # the final local step raises: refund and release, ERRORED


@dataclass(frozen=True, slots=True)
class Order:
    number: int
    outcome: Outcome

    @property
    def idempotency_key(self) -> str:
        return f"order-{self.number}"

    def context(self) -> dict[str, Any]:
        """The saga's initial context."""
        return {
            "order": self.number,
            "sku": f"sku-{self.number % 7}",
            "quantity": 1 + self.number % 3,
            "amount": PAYMENT_LIMIT + 1 if self.outcome is Outcome.REFUSED else 10 + self.number % 900,
            "crash": self.outcome is Outcome.CRASHED,
            "fail_local": self.outcome is Outcome.LOCAL_FAILURE,
        }

    @property
    def expected_status(self) -> SagaStatus:
        return SagaStatus.FINISHED if self.outcome is Outcome.GOOD else SagaStatus.ERRORED

    @property
    def expected_effects(self) -> dict[tuple[str, str], int]:
        """``(service, effect) -> count`` the participants must have recorded for this order."""
        charge = {
            Outcome.GOOD: "charge",
            Outcome.LOCAL_FAILURE: "charge",
            Outcome.REFUSED: "charge_refused",
            Outcome.CRASHED: "charge_crashed",
        }[self.outcome]
        effects = {("inventory", "reserve"): 1, ("payment", charge): 1}
        if self.outcome is not Outcome.GOOD:
            effects["inventory", "release"] = 1
        if self.outcome is Outcome.LOCAL_FAILURE:
            effects["payment", "refund"] = 1
        return effects


def orders(count: int) -> list[Order]:
    """``count`` orders: 60 % good, 20 % refused, 10 % crashed, 10 % failing locally."""
    pattern = [Outcome.GOOD] * 6 + [Outcome.REFUSED] * 2 + [Outcome.CRASHED, Outcome.LOCAL_FAILURE]
    return [Order(number, pattern[number % len(pattern)]) for number in range(count)]


@dataclass(frozen=True, slots=True)
class Names:
    """Service and topic names of one test run; the random suffix keeps runs apart on a shared broker."""

    suffix: str

    @property
    def orchestrator(self) -> str:
        return f"order{self.suffix}"

    @property
    def inventory(self) -> str:
        return f"inventory{self.suffix}"

    @property
    def payment(self) -> str:
        return f"payment{self.suffix}"

    @property
    def reserve_stock(self) -> str:
        return f"ReserveStock{self.suffix}"

    @property
    def release_stock(self) -> str:
        return f"ReleaseStock{self.suffix}"

    @property
    def charge_payment(self) -> str:
        return f"ChargePayment{self.suffix}"

    @property
    def refund_payment(self) -> str:
        return f"RefundPayment{self.suffix}"
