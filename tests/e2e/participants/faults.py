"""Fault injection of the participant processes of the crash suite, armed by an environment variable.

``PARTICIPANT_CRASH=point:n`` makes the process SIGKILL itself the n-th time it passes ``point``:

* ``effect``: inside a handler, after its write and before the transaction commits;
* ``publish``: after a reply's transaction committed, right before the reply is published.

The process prints ``CRASH point n`` to stdout first, so the test counts the kills it caused.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from broker import BrokerMessage

POINTS = ("effect", "publish")


class CrashPoint:
    """Counts passes through each point and kills the process at the armed one."""

    def __init__(self, spec: str | None = None) -> None:
        spec = os.environ.get("PARTICIPANT_CRASH", "") if spec is None else spec
        point, _, count = spec.partition(":")
        self.point = point or None
        self.at = int(count) if count else 1
        self.passes = 0

    def hit(self, point: str) -> None:
        if point != self.point:
            return
        self.passes += 1
        if self.passes == self.at:
            sys.stdout.write(f"CRASH {point} {self.at}\n")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class _CrashingPublisher:
    def __init__(self, publisher: Any, crash: CrashPoint, reply_topic: str) -> None:
        self._publisher = publisher
        self._crash = crash
        self._reply_topic = reply_topic

    async def send(self, message: BrokerMessage) -> None:
        if message.topic == self._reply_topic:
            self._crash.hit("publish")
        await self._publisher.send(message)

    async def send_batch(self, messages: Sequence[BrokerMessage]) -> None:
        await self._publisher.send_batch(messages)


class CrashingPool:
    """A broker pool whose publisher passes the ``publish`` crash point before each reply."""

    def __init__(self, pool: Any, crash: CrashPoint, reply_topic: str) -> None:
        self._pool = pool
        self._crash = crash
        self._reply_topic = reply_topic

    def publisher(self) -> _CrashingPublisher:
        return _CrashingPublisher(self._pool.publisher(), self._crash, self._reply_topic)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)
