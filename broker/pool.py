"""Transport ports: what the orchestration layer needs from a message broker.

Both adapters (`KafkaBrokerPool`, `InMemoryBrokerPool`) implement these protocols with the same semantics,
so tests of the orchestration layer run unchanged on either.

Semantics every adapter honours:

* A publisher's ``send`` returns only once the broker has acknowledged the record (``acks=all`` on Kafka).
* Subscribers belong to a consumer group. Within a group each record is handed to one subscriber; offsets
  advance only through ``commit``. A subscriber that stops without committing leaves its records to be
  redelivered to the group (at-least-once).
* Records with the same key keep their order.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from broker.message import BrokerMessage

__all__ = ["BrokerClientPool", "BrokerPublisher", "BrokerSubscriber"]


@runtime_checkable
class BrokerPublisher(Protocol):
    """Sends records; shared by every task of a process."""

    async def send(self, message: BrokerMessage) -> None:
        """Publish one record and wait for the broker's acknowledgement."""
        ...

    async def send_batch(self, messages: Sequence[BrokerMessage]) -> None:
        """Publish several records, waiting for all acknowledgements (order kept per key)."""
        ...


@runtime_checkable
class BrokerSubscriber(Protocol):
    """Reads records of some topics as a member of a consumer group."""

    async def start(self) -> None:
        """Join the group; returns once partitions can be fetched."""
        ...

    async def stop(self) -> None:
        """Leave the group without committing anything further."""
        ...

    async def getmany(self, *, timeout: float = 1.0, max_records: int = 500) -> list[BrokerMessage]:  # noqa: ASYNC109
        """Return the next records (possibly none once ``timeout`` seconds pass)."""
        ...

    async def commit(self, messages: Sequence[BrokerMessage]) -> None:
        """Commit, per partition, the offset after the highest of ``messages``."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class BrokerClientPool(Protocol):
    """Owns a process's broker clients: one shared publisher and any number of subscribers."""

    async def start(self) -> None:
        """Connect the publisher; idempotent."""
        ...

    async def stop(self) -> None:
        """Flush and close the publisher and every subscriber created from this pool; idempotent."""
        ...

    def publisher(self) -> BrokerPublisher:
        """The shared publisher (the pool must be started)."""
        ...

    def subscriber(self, topics: Sequence[str], *, group_id: str) -> BrokerSubscriber:
        """A new, not yet started, subscriber of ``topics`` in consumer group ``group_id``."""
        ...

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        """Create the topics that do not exist yet, with the pool's partitions and replication."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
