"""The one message type every transport speaks.

`BrokerMessage` is deliberately dumb: bytes in, bytes out, string headers. Serialization and the meaning of
headers belong to the orchestration layer, so a transport never needs to know what a saga is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["BrokerMessage"]


@dataclass(frozen=True, slots=True)
class BrokerMessage:
    """A record published to, or consumed from, a topic.

    Attributes:
        topic: Topic the record goes to or came from.
        key: Partitioning key. Records with the same key land on one partition, which keeps a saga's
            traffic in order when it is keyed by execution id.
        value: Payload bytes, opaque to the transport.
        headers: String headers (decoded as UTF-8 on the way in; undecodable values are dropped by the
            transport and reported through ``invalid_headers``).
        partition: Partition the record was read from (``None`` when publishing).
        offset: Offset the record was read at (``None`` when publishing).
        invalid_headers: Names of headers the transport could not decode; consumers treat a non-empty
            tuple as malformed input instead of guessing.
    """

    topic: str
    key: bytes | None
    value: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    partition: int | None = None
    offset: int | None = None
    invalid_headers: tuple[str, ...] = ()
