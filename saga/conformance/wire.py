"""The conformance kit's side of the wire: it publishes commands and decisions as an orchestrator would,
and collects the replies and dead letters a participant sends back.

Everything the kit reads is kept in memory for the run and looked up by execution id, which is unique to
each case, so a topic's older records never confuse a case.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from broker import BrokerClientPool, BrokerError, BrokerMessage, BrokerSubscriber
from saga.messages import H_EXECUTION_ID

__all__ = ["Collector", "execution_of"]

_log = logging.getLogger(__name__)


def execution_of(message: BrokerMessage) -> str | None:
    """The execution a record belongs to: its ``saga-execution-id`` header, else its key."""
    execution = message.headers.get(H_EXECUTION_ID)
    if execution:
        return execution.lower()
    if message.key is None:
        return None
    try:
        return message.key.decode().lower()
    except UnicodeDecodeError:
        return None


class Collector:
    """Reads one topic in the background and lets a case wait for the records it expects.

    Args:
        pool: Transport.
        topic: Topic to read (created when missing).
        group_id: Consumer group; the kit commits what it read, so the next run starts after it.
    """

    def __init__(self, pool: BrokerClientPool, topic: str, group_id: str) -> None:
        self.pool = pool
        self.topic = topic
        self.group_id = group_id
        self.records: list[BrokerMessage] = []
        self._changed = asyncio.Condition()
        self._subscriber: BrokerSubscriber | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, *, within: float) -> None:
        """Join the group and wait (up to ``within`` seconds) until partitions are assigned."""
        await self.pool.ensure_topics([self.topic])
        subscriber = self.pool.subscriber([self.topic], group_id=self.group_id)
        await subscriber.start()
        self._subscriber = subscriber
        assignment: Callable[[], frozenset[object]] | None = getattr(subscriber, "assignment", None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            self._keep(await subscriber.getmany(timeout=0.2, max_records=500))
            if assignment is None or assignment() or loop.time() > deadline:
                break
        self._task = asyncio.create_task(self._run(subscriber), name=f"conformance-{self.topic}")

    async def stop(self) -> None:
        """Stop reading and leave the group."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, BrokerError):
                await task
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            with contextlib.suppress(BrokerError):
                await subscriber.stop()

    def of(self, execution: str) -> list[BrokerMessage]:
        """The records read so far that belong to ``execution``."""
        execution = execution.lower()
        return [record for record in self.records if execution_of(record) == execution]

    async def wait(
        self,
        execution: str,
        count: int,
        within: float,
        *,
        where: Callable[[BrokerMessage], bool] | None = None,
    ) -> list[BrokerMessage]:
        """The records of ``execution`` (those matching ``where``) once there are ``count``, or after
        ``within`` seconds.

        Returns what there is when the time runs out, maybe fewer than ``count``.
        """

        def found() -> list[BrokerMessage]:
            return [r for r in self.of(execution) if where is None or where(r)]

        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self._changed.wait_for(lambda: len(found()) >= count)
            return found()

    async def _run(self, subscriber: BrokerSubscriber) -> None:
        while True:
            try:
                records = await subscriber.getmany(timeout=0.5, max_records=500)
            except BrokerError as exc:
                if not exc.retriable:
                    raise
                _log.warning("conformance: reading %s failed (%s); retrying", self.topic, exc)
                await asyncio.sleep(0.2)
                continue
            if records:
                self._keep(records)
                async with self._changed:
                    self._changed.notify_all()
                with contextlib.suppress(BrokerError):
                    await subscriber.commit(records)

    def _keep(self, records: list[BrokerMessage]) -> None:
        self.records.extend(record for record in records if record.topic == self.topic)
