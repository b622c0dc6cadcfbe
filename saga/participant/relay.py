"""The participant's reply relay: replies committed but not known to be published reach the broker.

An instance publishes each reply itself right after its transaction commits and hands the outbox row's id
here to be deleted (in batches, off the handling path). A row left behind by an instance that died between
its commit and its publish is published by whichever instance's relay finds it older than ``older_than``
seconds; the orchestrator drops the duplicate when the dead instance had in fact published it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from broker import BrokerClientPool, BrokerMessage
from storage.participant import OutboxRow, SqlParticipantStore

__all__ = ["ReplyRelay"]

_log = logging.getLogger("saga.participant")


class ReplyRelay:
    """Background task of one participant: forgets published rows, publishes forgotten ones.

    Args:
        store: The participant store.
        service: Rows of this service only.
        broker_pool: Publishes the replies.
        interval: Seconds between two passes.
        older_than: Age, in seconds, after which a row is taken for one whose instance will not publish it.
    """

    def __init__(
        self,
        store: SqlParticipantStore,
        service: str,
        broker_pool: BrokerClientPool,
        *,
        interval: float = 0.2,
        older_than: float = 5.0,
    ) -> None:
        self._store = store
        self._service = service
        self._pool = broker_pool
        self._interval = interval
        self._older_than = older_than
        self._published: list[int] = []
        self._task: asyncio.Task[None] | None = None
        self.relayed = 0

    def published(self, outbox_id: int) -> None:
        """Row ``outbox_id``'s reply was published by its own instance: delete it with the next batch."""
        self._published.append(outbox_id)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"participant-relay-{self._service}")

    async def stop(self) -> None:
        """Stop the loop, deleting the rows published meanwhile."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self._forget()

    async def run_once(self) -> int:
        """One pass: delete published rows, publish old ones; how many were relayed."""
        await self._forget()
        sent = await self._store.relay(self._service, self._send, older_than=self._older_than)
        self.relayed += sent
        return sent

    async def _forget(self) -> None:
        ids, self._published = self._published, []
        try:
            await self._store.forget_outbox(ids)
        except BaseException:
            self._published.extend(ids)
            raise

    async def _send(self, rows: Sequence[OutboxRow]) -> None:
        messages = [BrokerMessage(topic=r.topic, key=r.key, value=r.value, headers=r.headers) for r in rows]
        await self._pool.publisher().send_batch(messages)
        _log.info("%s: relayed %d replies left unpublished", self._service, len(messages))

    async def _run(self) -> None:
        while True:
            try:
                sent = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("%s: reply relay pass failed: %s", self._service, exc)
                sent = 0
            if not sent:
                await asyncio.sleep(self._interval)
