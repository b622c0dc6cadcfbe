"""`DatabaseClock`: the orchestrator's "now", on the database's clock.

Leases, reply deadlines, step timeouts, saga deadlines and retry schedules are written by the orchestrator
and compared by the database (the recovery query, claims), so both must read one clock: the database's.
Storage statements use the server's ``now()``; what the orchestrator computes itself (a reply deadline, a
lease end written with a new execution) comes from this clock, which reads the database's time once
(`SupportsDatabaseTime`) and carries it forward on the process's monotonic clock. A host whose wall clock
is minutes off, or jumps, then sets the same deadlines as one whose clock is right: the error is the round
trip of one ``SELECT``, re-read every ``resync_seconds``.

Storages without `SupportsDatabaseTime` (third-party ones) leave it on the local clock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from storage import SupportsDatabaseTime

__all__ = ["DatabaseClock"]

_log = logging.getLogger(__name__)

_utc_now: Callable[[], datetime] = functools.partial(datetime.now, UTC)


class DatabaseClock:
    """A callable clock (timezone-aware UTC) that follows the database's time.

    Args:
        resync_seconds: How often the database's time is read again (bounds the monotonic clock's drift).
        fallback: The clock used before the first `sync` (and with storages that cannot tell their time).
    """

    __slots__ = ("_anchor", "_fallback", "_monotonic", "_resync", "_storage", "_task")

    def __init__(self, *, resync_seconds: float = 60.0, fallback: Callable[[], datetime] = _utc_now) -> None:
        if not (math.isfinite(resync_seconds) and resync_seconds > 0):
            raise ValueError(f"resync_seconds must be a finite number > 0, got {resync_seconds!r}")
        self._resync = resync_seconds
        self._fallback = fallback
        self._anchor: datetime | None = None
        self._monotonic = 0.0
        self._storage: SupportsDatabaseTime | None = None
        self._task: asyncio.Task[None] | None = None

    def __call__(self) -> datetime:
        anchor = self._anchor
        if anchor is None:
            return self._fallback()
        elapsed = time.monotonic() - self._monotonic
        if elapsed > self._resync:
            self._resync_soon()
        return anchor + timedelta(seconds=elapsed)

    @property
    def synced(self) -> bool:
        """Whether the clock follows the database (a `sync` succeeded)."""
        return self._anchor is not None

    async def sync(self, storage: object) -> None:
        """Read the storage's time and follow it from now on; a storage that cannot tell is left alone.

        Raises:
            StorageError: The read failed (the clock keeps its previous reference).
        """
        if not isinstance(storage, SupportsDatabaseTime):
            return
        self._storage = storage
        before = time.monotonic()
        now = await storage.database_time()
        after = time.monotonic()
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        # The server read its clock somewhere within the round trip: assume its middle.
        self._anchor, self._monotonic = now, (before + after) / 2

    def _resync_soon(self) -> None:
        storage = self._storage
        task = self._task
        if storage is None or (task is not None and not task.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._resync_quietly(storage), name="saga-clock-sync")

    async def _resync_quietly(self, storage: SupportsDatabaseTime) -> None:
        try:
            await self.sync(storage)
        except Exception as exc:  # keep the last reference; a later read of the clock tries again
            _log.warning("reading the database's time failed: %s", exc)
