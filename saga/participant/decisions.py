"""Autocommit decisions at a participant: ``commit`` / ``reject`` handlers run once per decision.

With a store the decision is claimed like a command (so two instances never run it at once) and marked done
in the store; without one, the dedup store remembers it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from saga.messages import SagaControl, encode_json
from saga.participant.claims import StoreFlow
from saga.participant.dedup import ReplyStore
from saga.participant.support import DeadLetter
from saga.participant.types import DecisionHandler

__all__ = ["decide_with_dedup", "decide_with_store", "run_decision"]

_log = logging.getLogger("saga.participant")

Call = Callable[..., Awaitable[Any]]


async def run_decision(control: SagaControl, handlers: Sequence[DecisionHandler]) -> None:
    """Run the decision's handlers in turn; a failing one dead-letters the decision."""
    for fn in handlers:
        try:
            result = fn(control)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            _log.exception("%s %s handler failed", control.service, control.action)
            raise DeadLetter(
                "decision_failed", f"{control.action} handler raised {type(exc).__name__}: {exc}"
            ) from exc


async def decide_with_store(
    flow: StoreFlow, control: SagaControl, handlers: Sequence[DecisionHandler], call: Call
) -> bool:
    """Claim, run and mark the decision done; ``False`` when it was already done."""
    key = control.idempotency_key
    claim = await flow.claim(key, "decision", str(control.execution_id), None)
    if claim.outcome == "done":
        return False
    store = flow.store

    async def done() -> None:
        async with store.transaction() as conn:
            await store.complete(
                conn,
                flow.service,
                key,
                owner=flow.owner,
                status=200,
                value=encode_json({"decision": control.action}),
                reply_topic=None,
            )

    async with flow.renewing(key):
        await run_decision(control, handlers)
        await call(done)
    return True


async def decide_with_dedup(
    replies: ReplyStore, control: SagaControl, handlers: Sequence[DecisionHandler], call: Call
) -> bool:
    """Run the decision unless the dedup store has it; ``False`` when it was already done."""
    # Several services may share one store; the decision's own key is per execution and action only.
    key = control.idempotency_key
    if await call(replies.get_command_reply, key) is not None:
        return False
    await run_decision(control, handlers)
    await call(replies.put_command_reply, key, encode_json({"decision": control.action}))
    return True
