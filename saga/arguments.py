"""Checks of `SagaManager.run`'s arguments, made before anything is stored.

``user`` and ``idempotency_key`` travel as Kafka headers and are stored in 255-character columns, so they
must be strings that are valid UTF-8 and fit; an idempotency key names one start of one saga.
"""

from __future__ import annotations

import uuid

from saga.definitions import Saga
from storage import DuplicateIdempotencyKeyError, ExecutionRecord

__all__ = ["check_header_text", "check_user", "same_saga"]

#: Longest ``user`` and ``idempotency_key`` (their storage columns hold 255 characters).
_MAX_HEADER_TEXT = 255


def check_header_text(value: object, name: str) -> str:
    """``value`` if it can travel as a header and be stored: a valid UTF-8 str of 255 characters or fewer."""
    if not isinstance(value, str):
        raise TypeError(f"run(): {name} must be a str, got {type(value).__name__} {value!r}")
    if len(value) > _MAX_HEADER_TEXT:
        raise ValueError(f"run(): {name} is {len(value)} characters long; at most {_MAX_HEADER_TEXT} fit")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"run(): {name} is not valid UTF-8 (lone surrogate {value[exc.start]!r} at {exc.start})"
            ) from None
    return value


def check_user(user: object) -> str | None:
    """The user as stored: a string as given, a UUID as its string; anything else raises."""
    if user is None:
        return None
    if isinstance(user, uuid.UUID):
        return str(user)
    if not isinstance(user, str):
        raise TypeError(f"run(): user must be a str or a uuid.UUID, got {type(user).__name__} {user!r}")
    return check_header_text(user, "user")


def same_saga(existing: ExecutionRecord, saga: Saga, idempotency_key: str) -> ExecutionRecord:
    """``existing`` if it is an execution of ``saga`` (any version): a key names one start of one saga.

    Raises:
        DuplicateIdempotencyKeyError: The key started an execution of another saga; naming both, so the
            caller sees why their saga did not start instead of getting the other one's execution back.
    """
    if existing.name != saga.name:
        raise DuplicateIdempotencyKeyError(
            idempotency_key, existing.id, existing_saga=existing.name, saga=saga.name
        )
    return existing
