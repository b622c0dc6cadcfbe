"""What a participant without a participant store does, and decisions with or without one.

Without a store, a command's reply is remembered in the dedup store under its idempotency key
(`answer_with_dedup`): at-least-once effects. Autocommit decisions (``commit`` / ``reject`` handlers) run
once per decision: with a store the decision is claimed like a command (so two instances never run it at
once) and marked done in the store; without one, the dedup store remembers it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from broker import BrokerMessage
from saga.messages import H_STATUS, SagaCommand, SagaControl, encode_json
from saga.participant.claims import HandlerSpec, StoreFlow, command_context, run_handler
from saga.participant.dedup import ReplyStore
from saga.participant.replies import reply_to, sized_reply
from saga.participant.support import DeadLetter, stored_outcome, stored_reply
from saga.participant.types import CommandHandler, DecisionHandler, ParticipantStats
from storage.participant import CommandKind

__all__ = ["answer_with_dedup", "command_kind", "decide_with_dedup", "decide_with_store", "run_decision"]

_log = logging.getLogger("saga.participant")

Call = Callable[..., Awaitable[Any]]


def command_kind(topic: str, spec: HandlerSpec, specs: Iterable[HandlerSpec]) -> CommandKind:
    """A compensation (``compensates=``), the forward command some compensation names, or neither."""
    if spec.compensates is not None:
        return "compensate"
    if any(other.compensates == topic for other in specs):
        return "forward"
    return "plain"


async def answer_with_dedup(
    replies: ReplyStore,
    message: BrokerMessage,
    command: SagaCommand,
    handler: CommandHandler,
    *,
    call: Call,
    publish: Callable[[BrokerMessage], Awaitable[None]],
    service: str,
    limit: int,
    stats: ParticipantStats,
) -> None:
    """Answer ``command`` from its stored reply, or run ``handler`` and store its reply, then publish it.

    The reply is stored before it is published, so a crash between the two re-sends the same reply; a
    crash after the handler's effect and before the stored reply runs the handler again on redelivery.
    """
    key = command.idempotency_key
    stored = await call(replies.get_command_reply, key)
    if stored is not None:
        stats.duplicates += 1
        _log.debug("command %s already handled; re-sending its reply", key)
        status, value = stored_outcome(key, stored)
        reply = reply_to(message, command, status, value, service)
    else:
        status, value = await run_handler(handler, command_context(command, message, None), stats, service)
        reply = sized_reply(message, command, status, value, service=service, limit=limit, stats=stats)
        await call(replies.put_command_reply, key, stored_reply(int(reply.headers[H_STATUS]), reply.value))
    await publish(reply)


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
