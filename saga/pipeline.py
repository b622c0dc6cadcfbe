"""`KeyedPipeline`: a consumer's fetch loop, records handled in order per key, offsets committed behind.

Handling a fetched batch to its end before fetching again made every record wait for the slowest one of its
batch, and left the consumer idle while a reply already waited on the broker; committing offsets between
batches added a coordinator round trip to each. Here the fetch loop only dispatches, and a committer task
(`OffsetCommitter`) commits in the background:

* **In order per lane, lanes concurrently.** A record goes to its lane (the caller's key: the execution id
  for replies, the partition for commands); a lane handles its records one after the other in fetch order,
  in its own task, while other lanes run and the fetch loop reads on.
* **Bounded.** At most ``concurrency`` records are in progress (fetched and not yet finished). A fetch asks
  for no more than the room left and, with none left, the fetch loop waits: backpressure, bounded memory.
* **Never past a record not handled.** A partition's committable offset is that of its oldest unfinished
  record (in fetch order), or the one after its last fetched record when none is unfinished. A record still
  retrying holds back its own partition's commit, not other lanes' handling. A rebalance that rewinds a
  partition only re-feeds records already handled, which consumers recognise as duplicates; offsets of
  partitions the member lost are dropped by the subscriber's ``commit``.
* **Stopping.** `stop` abandons a fetch in flight (its records are not committed, so redelivered), lets the
  records in progress finish for up to its grace period, cancels the rest (left uncommitted), then commits
  what was handled, all before the caller leaves the group.
* **A record runs in the task that fetched it.** Every hand-over between tasks costs an event-loop
  iteration (an ``epoll`` call, and whatever else is ready runs first, such as the client's next fetch
  request), so a fetch is awaited directly, not raced against a halt event in tasks of its own, and a
  fetch that brings a new lane hands *fetching* over to a new task and runs that lane's first record at
  once in the task that received it. The other new lanes of the batch get tasks of their own.
* **Failing.** A record whose handling raises halts the pipeline like a stop: fetching ends, the other
  records in progress finish, handled offsets are committed, and `run` raises the error.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from broker import BrokerMessage, BrokerSubscriber
from saga.committer import OffsetCommitter, TopicPartition

__all__ = ["FetchFailed", "KeyedPipeline", "Process"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: A lane's key and its queue of ``(record, fetch sequence number)``, oldest first.
_Lane = tuple[Hashable, deque[tuple[BrokerMessage, int]]]

#: Seconds cancelled handlers get to unwind, and the last commit to complete, even after a zero grace:
#: "stop now" still means "commit what was handled".
_MIN_WIND_UP = 1.0

#: Handles one record completely: ``True`` once handled (committable), ``False`` to leave it unhandled
#: because the consumer is stopping; raising fails the pipeline.
Process = Callable[[BrokerMessage], Awaitable[bool]]
#: Told of a failed fetch and how many failed in a row: returns the pause before the next, or raises to
#: fail the pipeline.
FetchFailed = Callable[[Exception, int], float]


class _Halted(Exception):
    """Internal: the pipeline halted while the fetcher waited; what it waited for is abandoned."""


@dataclass(slots=True)
class _Partition:
    """What decides a partition's committable offset."""

    #: Records fetched and not handled: fetch sequence number -> offset, oldest first.
    unfinished: dict[int, int]
    #: Offset after the last record fetched.
    next_offset: int
    #: Last committable offset handed to the committer (or the first offset fetched).
    committable: int


class KeyedPipeline:
    """Fetches records of a subscriber and handles them, in order per lane, committing behind.

    Args:
        subscriber: A started group member; the pipeline fetches and commits, the caller stops it.
        process: Handles one record (see `Process`).
        lane: A record's lane; records of one lane are handled in fetch order.
        concurrency: Most records in progress at once.
        max_records: Most records per fetch.
        poll_timeout: Seconds a fetch waits for records.
        on_fetch_error: Decides what a failed fetch does (see `FetchFailed`).
        name: How log lines name the consumer.
        retry_initial: First pause after a retriable commit failure.
        retry_max: Longest pause between commit attempts.
        commit_interval: Least time between the starts of two offset commits (see `OffsetCommitter`).
        grace: Default for `stop`'s grace period; also bounds the unwinding of cancelled handlers and
            the last commit (at least a second each).
    """

    def __init__(
        self,
        subscriber: BrokerSubscriber,
        process: Process,
        *,
        lane: Callable[[BrokerMessage], Hashable],
        concurrency: int,
        max_records: int,
        poll_timeout: float,
        on_fetch_error: FetchFailed,
        name: str,
        retry_initial: float,
        retry_max: float,
        grace: float,
        commit_interval: float = 0.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self._subscriber = subscriber
        self._process = process
        self._lane_of = lane
        self._concurrency = concurrency
        self._max_records = max_records
        self._poll_timeout = poll_timeout
        self._on_fetch_error = on_fetch_error
        self._name = name
        self._grace = grace
        self.committer = OffsetCommitter(
            subscriber,
            name=name,
            retry_initial=retry_initial,
            retry_max=retry_max,
            interval=commit_interval,
        )
        self._lanes: dict[Hashable, deque[tuple[BrokerMessage, int]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # the fetcher and the lanes
        self._fetcher: asyncio.Task[None] | None = None  # the one task fetching, if any
        self._fetch_ended = asyncio.Event()
        self._waiting = False  # the fetcher is in a wait that halting abandons (`_interruptible`)
        self._abandoned = False  # halting cancelled that wait
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._sequence = 0
        self._in_progress = 0
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._halted = False  # stop asked for, or a record failed: fetch no more
        self._stopped = asyncio.Event()
        self._error: BaseException | None = None

    @property
    def in_progress(self) -> int:
        """Records fetched and not finished yet."""
        return self._in_progress

    def stop(self, grace: float | None = None) -> None:
        """Ask `run` to end: no more fetching; records in progress get ``grace`` seconds to finish."""
        if grace is not None:
            self._grace = grace
        self._stopped.set()
        self._halt()

    async def run(self) -> None:
        """Fetch and handle until `stop` or a failure, then finish, commit, and return.

        Raises:
            Exception: What a record's handling or ``on_fetch_error`` raised, once the other records in
                progress finished and the handled offsets were committed.
        """
        try:
            self._start_fetcher()
            await self._fetch_ended.wait()
            await self._finish()
        finally:
            await self._abort()
            await self.committer.close(max(self._grace, _MIN_WIND_UP))
        if self._error is not None:
            raise self._error

    # -- fetching ----------------------------------------------------------------------------------------

    def _start_fetcher(self) -> None:
        self._fetcher = self._spawn(self._fetch())

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _fetch(self) -> None:
        """Fetch until halted, or until a fetch brings a new lane: then fetching goes on in a new task.

        The new lane runs here, so its first record starts without waiting for a task to be scheduled.
        """
        lane: _Lane | None = None
        try:
            lane = await self._fetch_loop()
        except Exception as exc:
            self._fail(exc)
        finally:
            if lane is None:
                self._fetcher = None
                self._fetch_ended.set()
        if lane is not None:
            self._start_fetcher()
            await self._run_lane(*lane)

    async def _fetch_loop(self) -> _Lane | None:
        """Fetch and dispatch; returns a new lane for the calling task to run, or ``None`` once halted."""
        failures = 0
        try:
            while not self._halted:
                room = self._concurrency - self._in_progress
                if room <= 0:
                    await self._interruptible(self._room.wait())
                    continue
                try:
                    batch = await self._interruptible(
                        self._subscriber.getmany(
                            timeout=self._poll_timeout, max_records=min(self._max_records, room)
                        )
                    )
                except _Halted:
                    raise
                except Exception as exc:
                    failures += 1
                    await self._interruptible(asyncio.sleep(self._on_fetch_error(exc, failures)))
                    continue
                failures = 0
                lane = self._dispatch(batch)
                if lane is not None:
                    return lane
        except _Halted:
            pass  # an abandoned fetch's records stay uncommitted, so they are redelivered
        return None

    async def _interruptible(self, awaitable: Awaitable[_T]) -> _T:
        """Await ``awaitable`` in the fetcher unless the pipeline halts first, which raises `_Halted`.

        `_halt` cancels the fetcher while it is in here. Racing the wait against a halt event instead
        took two more tasks and several loop iterations for every fetch.
        """
        self._waiting = True
        try:
            result = await awaitable
        except asyncio.CancelledError:
            if self._abandoned and self._uncancel() == 0:
                raise _Halted from None
            raise  # cancelled by someone else too: the caller's cancellation goes on
        finally:
            self._waiting = False
        if self._abandoned:  # ``awaitable`` swallowed the cancellation: still abandon its result
            self._uncancel()
            raise _Halted
        return result

    @staticmethod
    def _uncancel() -> int:
        task = asyncio.current_task()
        assert task is not None
        return task.uncancel()

    # -- dispatching -------------------------------------------------------------------------------------

    def _dispatch(self, batch: Sequence[BrokerMessage]) -> _Lane | None:
        """Queue ``batch`` on its lanes; a task starts each new lane but the first, which is returned."""
        first: _Lane | None = None
        for message in batch:
            self._sequence += 1
            sequence = self._sequence
            if message.offset is not None:
                tp = (message.topic, message.partition)
                partition = self._partitions.get(tp)
                if partition is None:
                    partition = self._partitions[tp] = _Partition({}, message.offset, message.offset)
                partition.unfinished[sequence] = message.offset
                partition.next_offset = message.offset + 1
            key = self._lane_of(message)
            queue = self._lanes.get(key)
            if queue is None:
                queue = self._lanes[key] = deque()
                if first is None:
                    first = (key, queue)
                else:
                    self._spawn(self._run_lane(key, queue))
            queue.append((message, sequence))
        if batch:
            self._in_progress += len(batch)
            self._idle.clear()
            if self._in_progress >= self._concurrency:
                self._room.clear()
        return first

    async def _run_lane(self, key: Hashable, queue: deque[tuple[BrokerMessage, int]]) -> None:
        """Handle one lane's records in order until it is empty, a record is abandoned, or one fails."""
        try:
            while queue:
                message, sequence = queue[0]
                if not await self._process(message):
                    self._halt()  # the consumer is stopping: the lane's records stay unhandled
                    return
                queue.popleft()
                self._release(1)
                self._handled(message, sequence)
        except Exception as exc:
            self._fail(exc)
        finally:
            # Whatever is left (abandoned, failed, cancelled) stays unfinished: it holds its partition back.
            self._release(len(queue))
            queue.clear()
            del self._lanes[key]

    def _handled(self, message: BrokerMessage, sequence: int) -> None:
        if message.offset is None:
            return
        tp = (message.topic, message.partition)
        partition = self._partitions[tp]
        del partition.unfinished[sequence]
        committable = next(iter(partition.unfinished.values()), partition.next_offset)
        if committable != partition.committable:
            partition.committable = committable
            self.committer.mark(tp, committable)

    def _release(self, count: int) -> None:
        self._in_progress -= count
        if self._in_progress < self._concurrency:
            self._room.set()
        if self._in_progress == 0:
            self._idle.set()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._halt()

    def _halt(self) -> None:
        """Fetch no more; a fetch in flight is abandoned (its records stay uncommitted, so redelivered)."""
        if self._halted:
            return
        self._halted = True
        fetcher = self._fetcher
        if self._waiting and fetcher is not None and fetcher is not asyncio.current_task():
            self._abandoned = True
            fetcher.cancel()

    # -- ending ------------------------------------------------------------------------------------------

    async def _finish(self) -> None:
        """Let the records in progress finish: all of them, but after `stop` only within its grace."""
        idle = asyncio.ensure_future(self._idle.wait())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait((idle, stopped), return_when=asyncio.FIRST_COMPLETED)
            if not idle.done():
                await asyncio.wait((idle,), timeout=self._grace)
        finally:
            idle.cancel()
            stopped.cancel()

    async def _abort(self) -> None:
        """Cancel the lanes still running; their records stay uncommitted and are redelivered."""
        tasks = {task for task in self._tasks if not task.done()}
        if not tasks:
            return
        if self._in_progress:
            _log.warning("%s: %d record(s) still in progress are abandoned", self._name, self._in_progress)
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=max(self._grace, _MIN_WIND_UP))
        if pending:
            _log.error("%s: %d record handler(s) ignored cancellation", self._name, len(pending))
