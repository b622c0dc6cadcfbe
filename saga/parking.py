"""Replies parked with their execution while this process lacks the execution's definition version.

A reply for an execution whose ``(name, version)`` the receiving process does not register cannot be
applied there, and must not be lost either: during a rolling deployment of v2 the v1 executions in flight
keep receiving replies, whichever process reads them. So the reply is stored with the execution (the
record's ``state`` document gains a ``parked`` list holding the reply as received, headers and value) and
its ``reply_deadline`` is set to now, which makes the execution due for recovery. A process that registers
the definition then finds it in its next recovery pass and applies the parked replies before anything
else (`SagaManager.recover`); processes without it skip it without counting an attempt.

Only the engine's own save replaces the state, and it does so when it applies a reply: a parked reply is
either the one the execution awaits (then applying it, or a redelivered copy of it, is what should
happen) or stale, so nothing is lost when the engine's next save leaves the list out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from datetime import datetime
from typing import Any

import orjson

from broker import BrokerMessage
from saga.errors import SagaBusyError
from saga.messages import SagaResponse
from saga.registry import SagaRegistry
from storage import TERMINAL_STATUSES, ExecutionRecord, ReplyRecord, SagaStorage, SupportsDefinitionCounts

__all__ = [
    "MAX_PARKED_REPLIES",
    "clear_parked",
    "keep_reply",
    "park_reply",
    "parked_replies",
    "unregistered_definitions",
]

#: Replies kept per execution; older ones are dropped first (they can only be stale or duplicates).
MAX_PARKED_REPLIES = 16

_PARKED = "parked"
#: The reply deadline the execution had before its first reply was parked, restored by `clear_parked`.
_DEADLINE = "parked_deadline"


def park_reply(record: ExecutionRecord, message: BrokerMessage, now: datetime) -> ExecutionRecord:
    """``record`` with ``message`` added to its parked replies and due for recovery at ``now``."""
    state: dict[str, Any] = orjson.loads(record.state)
    parked: list[dict[str, Any]] = list(state.get(_PARKED) or [])
    if not parked:
        deadline = record.reply_deadline
        state[_DEADLINE] = None if deadline is None else deadline.isoformat()
    # The value decoded as JSON on receipt, so it is valid UTF-8.
    parked.append({"h": dict(message.headers), "v": message.value.decode()})
    state[_PARKED] = parked[-MAX_PARKED_REPLIES:]
    due = now if record.reply_deadline is None else min(record.reply_deadline, now)
    return dataclasses.replace(record, state=orjson.dumps(state), reply_deadline=due)


async def keep_reply(
    storage: SagaStorage,
    registry: SagaRegistry,
    response: SagaResponse,
    message: BrokerMessage,
    now: datetime,
) -> bool:
    """`SagaManager.park_reply`: store ``message`` with its execution, unless another writer is in the way.

    Returns ``False`` (and records the reply as stale) when the execution is terminal.

    Raises:
        ExecutionNotFoundError: No such execution.
        SagaBusyError: Another worker holds a live claim, or the definition is registered after all.
        ConcurrencyError: The row changed meanwhile.
    """
    record = await storage.load(response.execution_id)
    if (record.name, record.definition_version) in registry:
        raise SagaBusyError(
            f"saga {record.name!r} v{record.definition_version} is registered here: apply the reply",
            execution_id=record.id,
        )
    if record.status in TERMINAL_STATUSES:
        reason = (
            f"execution is {record.status}; its definition v{record.definition_version} is not registered "
            "in the process that received the reply"
        )
        await storage.record_reply(
            ReplyRecord(record.id, response.request_id, int(response.status), "stale", reason=reason)
        )
        return False
    if record.owner is not None and record.lease_until is not None and record.lease_until > now:
        raise SagaBusyError(f"execution {record.id} is claimed by {record.owner}", execution_id=record.id)
    await storage.save(park_reply(record, message, now))
    return True


def parked_replies(record: ExecutionRecord, topic: str) -> list[BrokerMessage]:
    """The replies parked with ``record``, oldest first, as messages of ``topic`` (none: an empty list)."""
    if b'"parked"' not in record.state:  # the common case costs a substring search, not a parse
        return []
    entries = orjson.loads(record.state).get(_PARKED) or []
    return [
        BrokerMessage(
            topic=topic,
            key=str(record.id).encode(),
            value=str(entry["v"]).encode(),
            headers={str(k): str(v) for k, v in dict(entry["h"]).items()},
        )
        for entry in entries
    ]


def clear_parked(record: ExecutionRecord) -> ExecutionRecord:
    """``record`` without parked replies, its reply deadline as it was before the first was parked."""
    state: dict[str, Any] = orjson.loads(record.state)
    state.pop(_PARKED, None)
    deadline = state.pop(_DEADLINE, None)
    return dataclasses.replace(
        record,
        state=orjson.dumps(state),
        reply_deadline=None if deadline is None else datetime.fromisoformat(deadline),
    )


async def unregistered_definitions(
    storage: object, registered: Collection[tuple[str, int]], *, names: Collection[str] | None = None
) -> dict[tuple[str, int], int]:
    """Unfinished executions per ``(name, version)`` that ``registered`` does not hold.

    Their replies wait with them (see the module docstring) until a process registers that version.
    ``names`` limits the answer to those sagas (a database shared by several services holds others' too).
    Needs a storage with ``count_by_definition`` (`storage.SupportsDefinitionCounts`); others give ``{}``.
    """
    if not isinstance(storage, SupportsDefinitionCounts):
        return {}
    counts: dict[tuple[str, int], int] = {}
    for (name, version, status), count in (await storage.count_by_definition()).items():
        if status in TERMINAL_STATUSES or (name, version) in registered:
            continue
        if names is not None and name not in names:
            continue
        counts[name, version] = counts.get((name, version), 0) + count
    return counts
