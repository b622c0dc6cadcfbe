"""Replies as a participant sends them: wire headers, the size limit, and the protocol version check.

Every reply carries ``saga-protocol-version`` and the command's ``traceparent``/``tracestate``. A reply
over the size limit (the broker would refuse it for good) is replaced by a small ``SYSTEM_ERROR`` reply
saying so, so the saga compensates instead of waiting for a reply that never comes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping

from broker import BrokerMessage
from saga.messages import (
    H_PROTOCOL_VERSION,
    H_TRACEPARENT,
    H_TRACESTATE,
    PROTOCOL_VERSION,
    SagaCommand,
    SagaResponseStatus,
    encode_json,
    reply_message,
)
from saga.participant.types import ParticipantStats

__all__ = [
    "DEFAULT_MAX_REPLY_BYTES",
    "RECORD_OVERHEAD",
    "build_reply",
    "oversized_content",
    "record_size",
    "reply_to",
    "sized_reply",
]

_log = logging.getLogger("saga.participant")

#: The broker's default largest request (Kafka's and aiokafka's ``max_request_size``: 1 MiB).
DEFAULT_MAX_REPLY_BYTES = 1_048_576
#: Bytes a record batch adds around one record's key, value and headers (generous, so a reply that
#: passes the check is never refused by the broker).
RECORD_OVERHEAD = 512

_SYSTEM_ERROR = int(SagaResponseStatus.SYSTEM_ERROR)
_VERSION = str(PROTOCOL_VERSION)


def build_reply(
    topic: str,
    *,
    value: bytes,
    status: int,
    execution_id: uuid.UUID,
    request_id: uuid.UUID,
    service_name: str,
    command_headers: Mapping[str, str],
) -> BrokerMessage:
    """The reply to a command, with the protocol version and the command's trace context."""
    message = reply_message(
        topic,
        value=value,
        status=status,
        execution_id=execution_id,
        request_id=request_id,
        service_name=service_name,
        traceparent=command_headers.get(H_TRACEPARENT),
    )
    headers = dict(message.headers)
    headers[H_PROTOCOL_VERSION] = _VERSION
    tracestate = command_headers.get(H_TRACESTATE)
    if tracestate is not None:
        headers[H_TRACESTATE] = tracestate
    return BrokerMessage(topic=message.topic, key=message.key, value=message.value, headers=headers)


def record_size(message: BrokerMessage) -> int:
    """Bytes ``message`` takes on the wire, overhead included (an upper bound)."""
    size = len(message.value) + len(message.key or b"") + len(message.topic) + RECORD_OVERHEAD
    for name, header in message.headers.items():
        size += len(name.encode()) + len(header.encode()) + 10
    return size


def oversized_content(size: int, limit: int) -> tuple[int, bytes]:
    """The small ``SYSTEM_ERROR`` reply that replaces a reply of ``size`` bytes over ``limit``."""
    return _SYSTEM_ERROR, encode_json(
        {
            "error": f"reply of {size} bytes is over the {limit}-byte limit",
            "reason": "reply_too_large",
            "size": size,
            "limit": limit,
        }
    )


def reply_to(
    message: BrokerMessage, command: SagaCommand, status: int, value: bytes, service: str
) -> BrokerMessage:
    """The reply to ``command`` (received as ``message``) with ``status`` and encoded content ``value``.

    Addressed from the command just received (reply topic, request id), not from the one first handled,
    so a replay under the same key that carries a new request id still gets an applicable reply.
    """
    return build_reply(
        command.reply_topic,
        value=value,
        status=status,
        execution_id=command.execution_id,
        request_id=command.request_id,
        service_name=service,
        command_headers=message.headers,
    )


def sized_reply(
    message: BrokerMessage,
    command: SagaCommand,
    status: int,
    value: bytes,
    *,
    service: str,
    limit: int,
    stats: ParticipantStats,
) -> BrokerMessage:
    """`reply_to`, or the small ``SYSTEM_ERROR`` reply saying it is over ``limit`` bytes."""
    reply = reply_to(message, command, status, value, service)
    size = record_size(reply)
    if size <= limit:
        return reply
    stats.oversized_replies += 1
    _log.error(
        "%s: reply to %s is %d bytes, over the %d-byte limit; replying %d instead",
        service, command.idempotency_key, size, limit, _SYSTEM_ERROR,
    )  # fmt: skip
    small_status, small_value = oversized_content(size, limit)
    return reply_to(message, command, small_status, small_value, service)
