"""Header encoding shared by the adapters: UTF-8 on the wire, strings in `BrokerMessage`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["decode_headers", "encode_headers"]


def decode_headers(raw: Iterable[tuple[str, bytes | None]]) -> tuple[dict[str, str], tuple[str, ...]]:
    """Decode header values as UTF-8.

    A value that is not valid UTF-8 (or is null) is left out of the headers and its name reported instead,
    so a malformed record reaches the consumer as data it can dead-letter rather than as an exception that
    would stop the fetch loop. When a name repeats, the last value wins.

    Returns:
        The decoded headers and the names of those that could not be decoded.
    """
    headers: dict[str, str] = {}
    invalid: list[str] = []
    for name, value in raw:
        if value is not None:
            try:
                # ``bytes(value)`` copies: only for the bytes-like values some clients hand out.
                headers[name] = (value if type(value) is bytes else bytes(value)).decode()
                continue
            except UnicodeDecodeError:
                pass
        invalid.append(name)
        headers.pop(name, None)
    return headers, tuple(dict.fromkeys(invalid)) if invalid else ()


def encode_headers(headers: Mapping[str, str]) -> list[tuple[str, bytes]]:
    """Headers as Kafka carries them: ``(name, UTF-8 bytes)`` pairs.

    Raises:
        TypeError: A name or value is not a string (serializing values is the caller's job).
    """
    encoded: list[tuple[str, bytes]] = []
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"header {name!r} must map a str to a str, got {type(value).__name__}")
        encoded.append((name, value.encode("utf-8")))
    return encoded
