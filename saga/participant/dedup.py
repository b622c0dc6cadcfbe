"""How a participant answers duplicates instead of re-running them: reply stores and per-key locks.

The reply of each command is stored under its idempotency key before it is published; a redelivered or
replayed command gets the stored reply again. `SagaStorage` is the durable store; `LruReplyStore` is the
bounded in-process fallback. The per-key lock keeps concurrent duplicates in one process from both missing
the store and running the handler twice.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["KeyLock", "KeyLocked", "LruReplyStore", "ReplyStore"]


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


class KeyLocked:
    """``async with KeyLocked(locks, key)`` holds ``key``'s lock: duplicates of a command run in turn.

    The entry in ``locks`` is created on first use and dropped when its last user leaves, so the table only
    holds keys in flight. A class rather than a generator-based context manager: it is entered for every
    command, and a generator costs a frame and two resumptions more.
    """

    __slots__ = ("_entry", "_key", "_locks")

    def __init__(self, locks: dict[str, KeyLock], key: str) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        entry = self._locks.get(self._key)
        if entry is None:
            entry = self._locks[self._key] = KeyLock()
        self._entry = entry
        entry.users += 1
        try:
            await entry.lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._entry.lock.release()
        self._leave()

    def _leave(self) -> None:
        entry = self._entry
        entry.users -= 1
        if entry.users == 0:
            del self._locks[self._key]
