"""The one JSON encoding every adapter uses for ``error``, step history and outbox headers.

orjson serialises frozen slotted dataclasses, UUIDs and datetimes natively; anything else that is a mapping
or a plain collection is converted, and everything else is refused with `TypeError`, on every backend alike,
so a value the SQL adapter would reject is rejected by the in-memory one too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["dumps", "json_copy"]


def _default(value: object) -> object:
    # Mappings that are not dicts (MappingProxyType, frozen dicts) arrive in `error` and `headers`.
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple | frozenset | set):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: object) -> bytes:
    """Encode ``value`` as JSON (raises `TypeError` for what JSON cannot hold)."""
    return orjson.dumps(value, default=_default)


def json_copy(value: Any) -> Any:
    """A deep copy of ``value`` as it would come back from a JSON column."""
    return orjson.loads(dumps(value))
