"""Unit-test fixtures for the saga engine: in-memory storage and broker, a fake participant, a clock, a step.

Test modules may define fixtures with the same names; theirs take precedence.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker import BrokerMessage, InMemoryBrokerPool
from saga.context import SagaContext
from saga.manager import SagaManager
from saga.messages import SagaCommand, SagaResponse
from storage.memory import MemorySagaStorage

#: What a fake participant's handler returns: ``(status, content)`` to reply, ``None`` to stay silent.
Reply = tuple[int, Any] | None
Handler = Callable[[SagaCommand], Reply | Awaitable[Reply]]


class FakeClock:
    """A clock tests move by hand (timezone-aware UTC)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class CountingStorage:
    """Wraps a storage and counts the calls made through it, by method name."""

    def __init__(self, inner: MemorySagaStorage) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attribute(*args, **kwargs)

        return counted


class FakeParticipant:
    """A stand-in participant service on the in-memory broker.

    Subscribes to ``topics`` and answers each command with ``handler(command)`` (default: 200 with the
    command's content echoed), as service ``service``. Every command received is kept in ``commands``.
    """

    def __init__(
        self,
        pool: InMemoryBrokerPool,
        service: str,
        topics: Sequence[str],
        handler: Handler | None = None,
    ) -> None:
        self.pool = pool
        self.service = service
        self.topics = list(topics)
        self.handler: Handler = handler or (lambda command: (200, command.content))
        self.commands: list[SagaCommand] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        subscriber = self.pool.subscriber(self.topics, group_id=f"{self.service}-participant")
        await subscriber.start()
        self._task = asyncio.create_task(self._run(subscriber))

    async def _run(self, subscriber: Any) -> None:
        try:
            while True:
                for message in await subscriber.getmany(timeout=0.05):
                    await self._answer(message)
                    await subscriber.commit([message])
        finally:
            await subscriber.stop()

    async def _answer(self, message: BrokerMessage) -> None:
        command = SagaCommand.from_message(message)
        self.commands.append(command)
        result = self.handler(command)
        if asyncio.iscoroutine(result):
            result = await result
        if result is None:
            return
        status, content = result  # type: ignore[misc]
        response = SagaResponse(content, status, command.execution_id, command.request_id, self.service)
        await self.pool.publisher().send(response.to_message(command.reply_topic))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def __aenter__(self) -> FakeParticipant:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def eventually(predicate: Callable[[], Awaitable[bool] | bool], *, within: float = 5.0) -> None:
    """Wait until ``predicate`` holds (background tasks run meanwhile)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def add(key: str, value: Any) -> Any:
    """A local step that sets ``ctx[key] = value``, named ``add_{key}`` (tests assert step names)."""

    def step(ctx: SagaContext) -> None:
        ctx[key] = value

    step.__name__ = f"add_{key}"
    return step


@pytest.fixture
def storage() -> MemorySagaStorage:
    return MemorySagaStorage()


@pytest.fixture
def pool() -> InMemoryBrokerPool:
    return InMemoryBrokerPool()


@pytest.fixture
async def manager(storage: MemorySagaStorage, pool: InMemoryBrokerPool) -> AsyncIterator[SagaManager]:
    m = SagaManager(
        storage, pool, service_name="orch", owner="test-owner", wait_poll_interval=0.05, relay_interval=0.05
    )
    await m.setup()
    try:
        yield m
    finally:
        await m.destroy()
