"""`OffsetCommitter`: a consumer's offset commits, in the background, coalesced, one at a time.

A Kafka offset commit is a round trip to the group coordinator. Awaiting it between fetches kept a
consumer from reading the next record that was already waiting, for every batch. Nothing needs the commit
before the next fetch: the records were handled (their state transaction committed), and a record whose
offset never reaches the group is only redelivered and recognised as a duplicate. So one task per consumer
commits while the consumer goes on:

* **Coalescing.** `mark` only records the latest committable offset of a partition. While a commit is in
  flight, later marks accumulate; the next commit carries all of them, whatever their number.
* **Spaced.** At most one commit starts per ``interval``: a commit is a write to the group coordinator
  (and a record in ``__consumer_offsets``) whatever the number of offsets it carries, so under load one
  commit per interval replaces one per handled batch. The price is the redelivery window after a crash,
  which is at most ``interval`` longer; redelivered records are recognised as duplicates.
* **In order.** One commit at a time, each with the newest offsets known when it starts, so the group never
  sees an older offset after a newer one from this consumer.
* **Errors as before.** A retriable failure is backed off and retried, carrying whatever was marked
  meanwhile; any other failure is logged and its offsets dropped (their records are redelivered).
* **A last commit on close**, after the one in flight, so what was handled before a stop reaches the group
  before the consumer leaves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from broker import BrokerError, BrokerMessage, BrokerSubscriber

__all__ = ["OffsetCommitter", "TopicPartition"]

_log = logging.getLogger(__name__)

#: ``(topic, partition)``; the partition is ``None`` only for records that did not come from a fetch.
TopicPartition = tuple[str, int | None]


class OffsetCommitter:
    """Commits, in its own task, the offsets a consumer marks as committable.

    Args:
        subscriber: The group member whose offsets these are.
        name: How log lines name the consumer.
        retry_initial: First pause (seconds) after a retriable failure; doubled up to ``retry_max``.
        retry_max: Longest pause.
        interval: Least time (seconds) from the start of one commit to the start of the next.
    """

    def __init__(
        self,
        subscriber: BrokerSubscriber,
        *,
        name: str,
        retry_initial: float,
        retry_max: float,
        interval: float = 0.0,
    ) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval}")
        self._interval = interval
        self._subscriber = subscriber
        self._name = name
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._pending: dict[TopicPartition, int] = {}
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Commits that reached the subscriber without an error (for observability and tests).
        self.commits = 0

    def mark(self, tp: TopicPartition, offset: int) -> None:
        """Ask for ``offset`` (the next record to read) to be committed on partition ``tp``."""
        self._pending[tp] = offset
        if self._task is None and not self._closing.is_set():
            self._task = asyncio.create_task(self._run(), name=f"offset-committer-{self._name}")
        self._wake.set()

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109
        """Let the commit in flight end, commit what is still marked (one attempt), stop the task.

        Args:
            timeout: Seconds each of the two steps may take before it is abandoned (the offsets are then
                not committed: their records are redelivered).
        """
        self._closing.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._pending:
            offsets, self._pending = self._pending, {}
            try:
                async with asyncio.timeout(timeout):
                    await self._commit(offsets, final=True)
            except TimeoutError:
                _log.warning("%s: last offset commit timed out; records may be redelivered", self._name)

    async def _run(self) -> None:
        failures = 0
        while not self._closing.is_set():
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            started = asyncio.get_running_loop().time()
            offsets, self._pending = self._pending, {}
            retry = await self._commit(offsets, final=False)
            if retry is None:
                failures = 0
                rest = self._interval - (asyncio.get_running_loop().time() - started)
                if rest > 0:  # marks made meanwhile wait for the next commit; close() commits at once
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closing.wait(), timeout=rest)
                continue
            failures += 1
            if failures == 1 or failures % 20 == 0:
                _log.warning("%s: offset commit failed (%s); retrying (%d)", self._name, retry, failures)
            delay = min(self._retry_max, self._retry_initial * 2 ** min(failures - 1, 16))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), timeout=delay)

    async def _commit(self, offsets: dict[TopicPartition, int], *, final: bool) -> BrokerError | None:
        """Commit ``offsets``; the error if it is worth retrying (the offsets are then marked again)."""
        # The subscriber commits "the offset after the highest of the messages": name the record before.
        messages = [
            BrokerMessage(topic=topic, key=None, value=b"", partition=partition, offset=offset - 1)
            for (topic, partition), offset in offsets.items()
        ]
        try:
            await self._subscriber.commit(messages)
        except BrokerError as exc:
            if exc.retriable and not final:
                for tp, offset in offsets.items():
                    self._pending.setdefault(tp, offset)  # a newer mark wins
                return exc
            _log.warning("%s: offset commit failed (%s); records may be redelivered", self._name, exc)
        except Exception:
            _log.exception("%s: offset commit failed; records may be redelivered", self._name)
        else:
            self.commits += 1
        return None
