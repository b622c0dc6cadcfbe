"""Publishing the commands a drive stored: fenced, each record with its own outcome.

`CommandPublishing` is the part of the manager (mixed into `saga.driver.ExecutionDriver`) that takes the
outbox rows a save just wrote to the broker. It keeps DESIGN's outbox rules in one place:

* a command is published from memory only right after the save that stored it (its claim's lease young);
  otherwise the relay, which hands out only rows their execution still awaits, publishes it;
* a delayed row (a retry's backoff) is the relay's, woken when it falls due;
* each record's publish has its own outcome: one refused for good fails its own step (a ``publish_rejected``
  500 of the manager's own, `_publish_rejected`), one that failed transiently backs off on its own
  (`saga.relay.settle_outcomes`); neither holds up the others;
* a command larger than the broker pool sends is refused before it is stored (`_oversized`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from broker import BrokerClientPool, BrokerError, BrokerMessage
from saga.errors import SagaBusyError
from saga.messages import SagaResponse, SagaResponseStatus
from saga.observability import tracing as _tracing
from storage import ExecutionNotFoundError, SagaStorage, StorageError, SupportsOutboxOutcomes
from storage.records import OutboxClaim, OutboxMessage, OutboxRecord, ReplyOutcome

if TYPE_CHECKING:
    from saga.relay import OutboxRelay

__all__ = ["CommandPublishing"]

_log = logging.getLogger("saga.driver")


class CommandPublishing:
    """Publishes what a drive stored (mixed into `saga.driver.ExecutionDriver`)."""

    storage: SagaStorage
    broker_pool: BrokerClientPool
    owner: str
    lease_seconds: float
    clock: Callable[[], datetime]
    relay: OutboxRelay | None
    #: Until when each publish sweeps every unsent row (`_flush_outbox`), set after a publish failed.
    _sweep_until: datetime | None = None

    def _sweeping(self) -> bool:
        until = self._sweep_until
        if until is None:
            return False
        if self.clock() < until:
            return True
        self._sweep_until = None
        return False

    async def _flush_outbox(
        self,
        written: Sequence[tuple[Sequence[OutboxMessage], OutboxClaim | None]] = (),
        *,
        execution_id: uuid.UUID | None = None,
        saved_at: float | None = None,
    ) -> None:
        """Publish the outbox rows just stored; the relay covers failures.

        Rows written under an `OutboxClaim` are published from the messages in hand and marked sent by the
        ids the save reported: two round trips (send, mark) and no ``fetch_outbox``. Otherwise, and for a
        while after a publish failed (so rows it left behind go out with the next publish once their
        lease is over), one `publish_outbox` pass sweeps every unsent row instead.

        Fencing: the messages in hand are current when the save returns; they are published from memory
        only while their claim's lease is young (``saved_at``): a process that stalled for longer leaves
        them to the relay, which publishes a command only while its execution still awaits it. Delayed
        rows (a retry's backoff) are the relay's too: it is woken when they fall due. With a publisher
        that reports each record's outcome, a record refused for good fails its own step and one that
        failed transiently backs off on its own (`saga.relay.settle_outcomes`).
        """
        from saga.relay import publish_outbox, settle_outcomes

        fresh = saved_at is None or time.monotonic() - saved_at < self.lease_seconds / 2
        try:
            if written and fresh and all(claim is not None for _, claim in written) and not self._sweeping():
                messages: list[BrokerMessage] = []
                ids: list[int] = []
                held: list[OutboxMessage] = []
                due_later: float | None = None
                for outbox, claim in written:
                    assert claim is not None
                    for message, row_id in zip(outbox, claim.ids, strict=True):
                        if message.delay is not None:
                            due_later = max(due_later or 0.0, message.delay)
                            continue
                        messages.append(
                            BrokerMessage(
                                topic=message.topic,
                                key=message.key,
                                value=message.value,
                                headers=message.headers,
                            )
                        )
                        ids.append(row_id)
                        held.append(message)
                if due_later is not None:
                    self._wake_relay_after(due_later)
                if not messages:
                    return
                publisher = self.broker_pool.publisher()
                send_each = getattr(publisher, "send_each", None)
                storage = self.storage
                if (
                    send_each is None
                    or execution_id is None
                    or not isinstance(storage, SupportsOutboxOutcomes)
                ):
                    with _tracing.publish_spans(messages) if _tracing.enabled else nullcontext():
                        await publisher.send_batch(messages)
                    self._mark_sent_soon(ids)
                    return
                with _tracing.publish_spans(messages) if _tracing.enabled else nullcontext():
                    outcomes = await send_each(messages)
                self._mark_sent_soon([i for i, outcome in zip(ids, outcomes, strict=True) if outcome is None])
                failed = [
                    (_row(row_id, execution_id, message), outcome)
                    for row_id, message, outcome in zip(ids, held, outcomes, strict=True)
                    if outcome is not None
                ]
                if failed:
                    await settle_outcomes(
                        storage,
                        [row for row, _ in failed],
                        [outcome for _, outcome in failed],
                        on_rejected=self._publish_rejected,
                    )
                    if self.relay is not None:
                        self.relay.wake()
            elif written and not fresh:
                _log.warning(
                    "outbox rows stored %.1fs ago are left to the relay", time.monotonic() - (saved_at or 0)
                )
            else:
                await publish_outbox(
                    self.storage,
                    self.broker_pool,
                    owner=self.owner,
                    lease_seconds=self.lease_seconds,
                    on_rejected=self._publish_rejected,
                )
        except (BrokerError, StorageError) as exc:
            _log.warning("publishing outbox rows failed (%s); the outbox relay will retry", exc)
            # The rows stay claimed by us until their lease ends; sweep for a while after that.
            self._sweep_until = self.clock() + timedelta(seconds=2 * self.lease_seconds)
            if self.relay is not None:
                self.relay.wake()

    def _wake_relay_after(self, seconds: float) -> None:
        """Have the relay look for due rows once a delayed row falls due (its own interval covers a miss)."""
        relay = self.relay
        if relay is not None:
            asyncio.get_running_loop().call_later(seconds + 0.05, relay.wake)

    def _oversized(self, outbox: Sequence[OutboxMessage]) -> tuple[OutboxMessage, dict[str, object]] | None:
        """A command of ``outbox`` larger than the broker pool sends, with its ``publish_rejected`` error.

        Checked before the command is stored whenever the pool tells its limit (``max_message_size``), so
        a command that can never be sent fails its step at once instead of waiting in the outbox.
        """
        pool = self.broker_pool
        limit = getattr(pool, "max_message_size", None)
        if not isinstance(limit, int):
            return None
        for message in outbox:
            if message.request_id is None:
                continue
            rough = len(message.value) + len(message.key or b"")
            rough += sum(len(k) + len(v) for k, v in message.headers.items())
            if 4 * rough + 1024 < limit:  # far below (headers are ASCII or UTF-8: at most 4 bytes a char)
                continue
            measure = getattr(pool, "message_size", None)
            broker_message = BrokerMessage(
                topic=message.topic, key=message.key, value=message.value, headers=message.headers
            )
            try:
                size = int(measure(broker_message)) if callable(measure) else rough
            except (TypeError, ValueError):
                continue  # unencodable: the publish refuses it
            if size > limit:
                return message, {
                    "type": "publish_rejected",
                    "error": f"the command is {size} bytes, over the broker's limit of {limit} bytes",
                    "reason": "record_too_large",
                    "topic": message.topic,
                    "size": size,
                    "limit": limit,
                }
        return None

    async def _publish_rejected(self, row: OutboxRecord, error: Mapping[str, object]) -> bool:
        """Fail the step of a stored command the broker refused for good, as a 500 reply of its own.

        Returns whether that is settled (applied, or the execution moved past the request already);
        ``False`` (another worker holds the execution, or it failed) leaves the row queued for a later try.
        """
        assert row.request_id is not None
        refusal = SagaResponse(
            content=dict(error),
            status=SagaResponseStatus.SYSTEM_ERROR,
            execution_id=row.execution_id,
            request_id=row.request_id,
        )
        try:
            outcome = await self.handle_reply(refusal)
        except SagaBusyError:
            return False
        except ExecutionNotFoundError:
            return True
        except Exception as exc:
            _log.warning(
                "execution %s: failing the step of a refused command failed: %s", row.execution_id, exc
            )
            return False
        _log.info("execution %s: refused command's step failed (%s)", row.execution_id, outcome)
        return True

    if TYPE_CHECKING:

        def _mark_sent_soon(self, ids: Sequence[int]) -> None:
            """Provided by `saga.driver.ExecutionDriver`."""

        async def handle_reply(
            self, response: SagaResponse, *, message: BrokerMessage | None = None
        ) -> ReplyOutcome:
            """Provided by `SagaManager`."""


def _row(row_id: int, execution_id: uuid.UUID, message: OutboxMessage) -> OutboxRecord:
    """The stored row of a message this process wrote and holds (for `saga.relay.settle_outcomes`)."""
    return OutboxRecord(
        row_id,
        execution_id,
        message.topic,
        message.key,
        message.value,
        message.headers,
        _EPOCH,
        message.request_id,
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
