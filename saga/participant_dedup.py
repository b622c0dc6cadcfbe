"""How a participant answers duplicates instead of re-running them: reply stores and per-key locks.

The reply of each command is stored under its idempotency key before it is published; a redelivered or
replayed command gets the stored reply again. `SagaStorage` is the durable store; `LruReplyStore` is the
bounded in-process fallback. The per-key lock keeps concurrent duplicates in one process from both missing
the store and running the handler twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["KeyLock", "LruReplyStore", "ReplyStore", "key_lock"]


class ReplyStore(Protocol):
    """Where replies are remembered by idempotency key (`SagaStorage` is one)."""

    async def get_command_reply(self, idempotency_key: str) -> bytes | None: ...

    async def put_command_reply(self, idempotency_key: str, reply: bytes) -> None: ...


class LruReplyStore:
    """Bounded in-process reply store, used when no `SagaStorage` is given (first write wins)."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._replies: OrderedDict[str, bytes] = OrderedDict()

    async def get_command_reply(self, idempotency_key: str) -> bytes | None:
        reply = self._replies.get(idempotency_key)
        if reply is not None:
            self._replies.move_to_end(idempotency_key)
        return reply

    async def put_command_reply(self, idempotency_key: str, reply: bytes) -> None:
        if idempotency_key in self._replies:
            return
        self._replies[idempotency_key] = reply
        while len(self._replies) > self._maxsize:
            self._replies.popitem(last=False)


@dataclass(slots=True)
class KeyLock:
    """One key's lock and how many tasks hold or await it; the entry goes once none do."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@contextlib.asynccontextmanager
async def key_lock(locks: dict[str, KeyLock], key: str) -> AsyncIterator[None]:
    """Hold ``key``'s lock in ``locks``, so concurrent duplicates of one command run one at a time.

    The entry is created on first use and dropped when its last user leaves, so the table only holds
    keys in flight.
    """
    entry = locks.get(key)
    if entry is None:
        entry = locks[key] = KeyLock()
    entry.users += 1
    try:
        async with entry.lock:
            yield
    finally:
        entry.users -= 1
        if entry.users == 0:
            del locks[key]
