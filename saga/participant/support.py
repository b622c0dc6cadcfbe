"""Small pieces shared by the participant's modules: lanes, the dedup store's reply format, dead letters."""

from __future__ import annotations

from broker import BrokerMessage
from saga.messages import decode_json, encode_json

__all__ = ["DeadLetter", "lane", "stored_outcome", "stored_reply"]


def lane(message: BrokerMessage) -> tuple[str, int | None, bytes | None]:
    """Records of one key (the saga execution id) are handled in offset order, other keys concurrently.

    A saga's commands and its decision share the key, so they reach handlers in the order the orchestrator
    published them; sagas sharing a partition have no order to keep between them, and handling them one
    after the other would cap a participant at one reply publish per partition at a time. Records without
    a key keep partition order.
    """
    return message.topic, message.partition, message.key


def stored_reply(status: int, value: bytes) -> bytes:
    """A reply as the dedup store keeps it: ``{"status": ..., "content": ...}``.

    Spliced around the reply's already encoded content: the same bytes `encode_json` makes of that dict,
    without encoding the content a second time.
    """
    return b'{"status":%d,"content":%b}' % (status, value)


def stored_outcome(key: str, stored: bytes) -> tuple[int, bytes]:
    """The status and encoded content of a reply `stored_reply` kept under ``key``."""
    data = decode_json(stored, field_name="stored reply")
    if not isinstance(data, dict) or not isinstance(data.get("status"), int):
        raise DeadLetter("bad_stored_reply", f"stored reply of {key!r} is unreadable")
    return data["status"], encode_json(data.get("content"))


class DeadLetter(Exception):
    """Internal: the record goes to the dead-letter topic for ``reason``."""

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason
