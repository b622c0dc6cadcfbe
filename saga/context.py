"""`SagaContext`: the data a saga carries from step to step, and its storable encoding.

The context is persisted after every step, so a value that cannot be stored must be refused where it is
set, not discovered by a recovery worker hours later. Values are limited to what JSON holds plus the few
types business code passes around all the time: ``UUID``, ``datetime`` (aware or naive, kept as given),
``date``, ``Decimal``, and lists, tuples and dicts of those.

JSON cannot tell a UUID from a string, so non-JSON values are written as one-key tagged objects
(``{"$uuid": "..."}``, ``{"$dt": "..."}``, ``{"$date": "..."}``, ``{"$dec": "..."}``, ``{"$tup": [...]}``,
``{"$int": "..."}`` for integers beyond 64 bits, which decoding still reads although setting one is
refused). A user dict that happens to look like a tag is wrapped in ``{"$esc": {...}}`` so decoding never
mistakes data for a tag.

What JSON peers cannot read is refused where it is set, with `SagaContextError` naming the key: strings
and keys that are not valid UTF-8 (lone surrogates), non-finite floats and Decimals, integers beyond
signed 64 bits, and containers nested deeper than `MAX_CONTEXT_DEPTH`. Encoding is one walk over the
values that builds the JSON-ready structure; orjson does the rest. Nothing here does I/O.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator, Mapping, MutableMapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson

from saga.errors import SagaContextError

__all__ = [
    "MAX_CONTEXT_DEPTH",
    "SagaContext",
    "decode_context",
    "decode_value",
    "encode_context",
    "encode_value",
]

_TAG_UUID = "$uuid"
_TAG_DATETIME = "$dt"
_TAG_DATE = "$date"
_TAG_DECIMAL = "$dec"
_TAG_TUPLE = "$tup"
_TAG_INT = "$int"
_TAG_ESCAPE = "$esc"
_TAGS = frozenset({_TAG_UUID, _TAG_DATETIME, _TAG_DATE, _TAG_DECIMAL, _TAG_TUPLE, _TAG_INT, _TAG_ESCAPE})

#: Integers a context holds: those every JSON peer with 64-bit integers reads (Java ``long``, Go ``int64``,
#: PostgreSQL ``bigint``), i.e. signed 64-bit. Wider ones are refused where they are set.
_INT_MIN = -(2**63)
_INT_MAX = 2**63
#: Deepest nesting of containers in a context value (a top-level list or dict is depth 1). JSON encoders
#: and peers limit nesting (orjson at 255 levels, counting the tags this encoding adds), so a deeper
#: value is refused where it is set instead of failing when it is stored or sent.
MAX_CONTEXT_DEPTH = 64


class _Unstorable(Exception):
    """Raised inside the walk; carries the path to the bad value so the error can name it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


def _check_text(text: str, path: str, what: str) -> None:
    """Refuse a string that is not valid UTF-8 (a lone surrogate): no JSON encoder or peer takes it."""
    if text.isascii():
        return
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise _Unstorable(
            path, f"{what} has a lone surrogate {text[exc.start]!r} at {exc.start} (not valid UTF-8)"
        ) from None


def encode_value(value: Any, path: str = "", depth: int = 0) -> Any:
    """Return ``value`` as a JSON-ready structure with tagged non-JSON types.

    ``depth`` is the nesting of ``value`` itself (0 for a context's top-level value).

    Raises:
        _Unstorable: A value (at ``path``) is not storable.
    """
    t = type(value)
    if t is str:
        if not value.isascii():
            _check_text(value, path, "string")
        return value
    if t is bool or value is None:
        return value
    if t is int:
        if _INT_MIN <= value < _INT_MAX:
            return value
        raise _Unstorable(path, f"integer {value} does not fit in 64 bits (signed), which JSON peers read")
    if t is float:
        if math.isfinite(value):
            return value
        raise _Unstorable(path, f"non-finite float {value!r} has no JSON form")
    if t is dict or t is SagaContext:
        return _encode_dict(value, path, depth)
    if t is list:
        _check_depth(path, depth)
        return [encode_value(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    if t is uuid.UUID:
        return {_TAG_UUID: str(value)}
    if t is datetime:
        return {_TAG_DATETIME: value.isoformat()}
    if t is date:
        return {_TAG_DATE: value.isoformat()}
    if t is Decimal:
        return _encode_decimal(value, path)
    if t is tuple:
        _check_depth(path, depth)
        return {_TAG_TUPLE: [encode_value(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]}
    return _encode_subclass(value, path, depth)


def _check_depth(path: str, depth: int) -> None:
    if depth >= MAX_CONTEXT_DEPTH:
        raise _Unstorable(path, f"nested deeper than {MAX_CONTEXT_DEPTH} levels")


def _encode_decimal(value: Decimal, path: str) -> dict[str, str]:
    if not value.is_finite():
        raise _Unstorable(path, f"Decimal {str(value)!r} is not a finite number")
    return {_TAG_DECIMAL: str(value)}


def _encode_subclass(value: Any, path: str, depth: int) -> Any:
    """Slow path: subclasses of the accepted types (StrEnum, IntEnum, OrderedDict...) lose their subclass."""
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return encode_value(str.__str__(value), path, depth)
    if isinstance(value, int):
        return encode_value(int(value), path, depth)
    if isinstance(value, float):
        return encode_value(float(value), path, depth)
    if isinstance(value, datetime):
        return {_TAG_DATETIME: datetime.isoformat(value)}
    if isinstance(value, date):
        return {_TAG_DATE: date.isoformat(value)}
    if isinstance(value, uuid.UUID):
        return {_TAG_UUID: str(value)}
    if isinstance(value, Decimal):
        return _encode_decimal(value, path)
    if isinstance(value, Mapping):
        return _encode_dict(value, path, depth)
    if isinstance(value, list | tuple):
        return encode_value(list(value) if isinstance(value, list) else tuple(value), path, depth)
    raise _Unstorable(
        path,
        f"{type(value).__qualname__} is not storable (use JSON types, UUID, datetime, date, Decimal, "
        "or lists, tuples and dicts of them)",
    )


def _encode_dict(value: Mapping[Any, Any], path: str, depth: int) -> dict[str, Any]:
    _check_depth(path, depth)
    out: dict[str, Any] = {}
    for key, item in value.items():
        if type(key) is not str:
            raise _Unstorable(path, f"dict key {key!r} is not a string")
        _check_text(key, path, f"dict key {key!r}")
        out[key] = encode_value(item, f"{path}.{key}" if path else key, depth + 1)
    if len(out) == 1 and next(iter(out)) in _TAGS:
        return {_TAG_ESCAPE: out}
    return out


def decode_value(value: Any) -> Any:
    """Inverse of `encode_value`: rebuild tagged values."""
    t = type(value)
    if t is dict:
        if len(value) == 1:
            tag, inner = next(iter(value.items()))
            if tag in _TAGS:
                return _decode_tag(tag, inner)
        return {k: decode_value(v) for k, v in value.items()}
    if t is list:
        return [decode_value(item) for item in value]
    return value


def _decode_tag(tag: str, inner: Any) -> Any:
    if tag == _TAG_UUID:
        return uuid.UUID(inner)
    if tag == _TAG_DATETIME:
        return datetime.fromisoformat(inner)
    if tag == _TAG_DATE:
        return date.fromisoformat(inner)
    if tag == _TAG_DECIMAL:
        return Decimal(inner)
    if tag == _TAG_TUPLE:
        return tuple(decode_value(item) for item in inner)
    if tag == _TAG_INT:
        return int(inner)
    # _TAG_ESCAPE: a user dict that looked like a tag; its own values are still encoded.
    return {k: decode_value(v) for k, v in inner.items()}


def encode_context(data: Mapping[str, Any], *, step: str | None = None) -> dict[str, Any]:
    """Encode a whole context (top-level keys are never tags, so no escaping is needed there).

    Given a `SagaContext`, only its entries that are not plain JSON scalars are walked (see
    `SagaContext._nested`); the others are their own encoding.

    Raises:
        SagaContextError: A value cannot be stored; names the key (and the step, when given).
    """
    if type(data) is SagaContext:
        entries = data._data
        out = entries.copy()
        nested = data._nested
        if nested:
            try:
                for key in nested:
                    out[key] = encode_value(entries[key], key)
            except _Unstorable as exc:
                raise _context_error(exc, step) from None
        return out
    out = {}
    try:
        for key, value in data.items():
            t = type(value)
            # Inline fast path for the common scalars; everything else takes the full walk.
            if type(key) is not str:
                raise _Unstorable(str(key), f"context key {key!r} is not a string")
            if not key.isascii():
                _check_text(key, key, "context key")
            if (
                (t is str and value.isascii())
                or t is bool
                or value is None
                or (t is int and _INT_MIN <= value < _INT_MAX)
            ):
                out[key] = value
            else:
                out[key] = encode_value(value, key)
    except _Unstorable as exc:
        raise _context_error(exc, step) from None
    return out


def decode_context(encoded: Mapping[str, Any]) -> SagaContext:
    """Rebuild a context from `encode_context`'s output (values are trusted: they were validated)."""
    ctx = SagaContext()
    data = ctx._data
    nested = ctx._nested
    for key, value in encoded.items():
        t = type(value)
        if t is dict or t is list:  # containers and tagged values
            data[key] = decode_value(value)
            nested[key] = None
        else:  # JSON scalars: integers in range, since wider ones are tagged
            data[key] = value
    return ctx


def _context_error(exc: _Unstorable, step: str | None) -> SagaContextError:
    key = exc.path.split(".", 1)[0].split("[", 1)[0]
    if not key.isascii():  # a key with a lone surrogate is named with it escaped, so logs can print it
        key = key.encode("utf-8", "backslashreplace").decode()
    where = f" (set in step {step!r})" if step else ""
    return SagaContextError(f"context value {exc.path!r}{where}: {exc.reason}", key=key, step=step)


class SagaContext(MutableMapping[str, Any]):
    """A mapping with attribute access that only accepts storable values.

    ``ctx.order_id`` and ``ctx["order_id"]`` are the same entry. Setting a value that cannot be stored
    raises `SagaContextError` naming the key at once, because the engine persists the context after every
    step and a late failure would leave the saga stuck.

    Example:
        >>> ctx = SagaContext(order_id=42)
        >>> ctx.total = Decimal("9.90")
        >>> ctx["total"]
        Decimal('9.90')
    """

    __slots__ = ("_data", "_nested")

    _data: dict[str, Any]
    #: The keys whose values are not plain JSON scalars (``str``, ``bool``, ``None``, finite ``float``,
    #: ``int`` within 64 bits), as an ordered set. Only those can change without a ``ctx[key] = ...`` (a
    #: list appended to in place) or need tags, so `encode_context` walks them alone and takes the others
    #: as they are. Kept by every method that writes ``_data``.
    _nested: dict[str, None]

    def __init__(self, data: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        entries: dict[str, Any] = {}
        _set_slot(self, "_data", entries)
        _set_slot(self, "_nested", {})
        if data is not None:
            if type(data) is SagaContext:
                # Plain entries were checked when set and cannot have changed; nested ones are checked again.
                entries.update(data._data)
                for key in data._nested:
                    _put_nested(self, key, data._data[key])
            else:
                for key, value in data.items():
                    t = type(value)
                    if (
                        type(key) is str
                        and key.isascii()
                        and (
                            (t is int and _INT_MIN <= value < _INT_MAX)
                            or (t is str and value.isascii())
                            or t is bool
                            or value is None
                        )
                    ):
                        entries[key] = value  # what __setitem__ does with a plain value, without the call
                    else:
                        self[key] = value
        for key, value in kwargs.items():
            self[key] = value

    # -- mapping protocol ------------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if type(key) is not str:
            raise SagaContextError(f"context keys must be strings, got {key!r}", key=str(key))
        if not key.isascii():
            try:
                _check_text(key, key, "context key")
            except _Unstorable as exc:
                raise _context_error(exc, None) from None
        t = type(value)
        if (
            (t is int and _INT_MIN <= value < _INT_MAX)
            or (t is str and value.isascii())
            or t is bool
            or value is None
        ):
            self._data[key] = value
            if self._nested:
                self._nested.pop(key, None)
        else:
            _put_nested(self, key, value)

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        if self._nested:
            self._nested.pop(key, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    # -- attribute access ------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails, so methods and slots take precedence.
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"SagaContext has no entry {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _RESERVED or name[:1] == "_":
            raise AttributeError(f"cannot set {name!r} on a SagaContext as an attribute; use ctx[{name!r}]")
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(f"SagaContext has no entry {name!r}") from None

    # -- conveniences ----------------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SagaContext):
            return self._data == other._data
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable mapping

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self._data.items())
        return f"SagaContext({items})"

    def copy(self) -> SagaContext:
        """A shallow copy (values are not re-validated: they were checked when set)."""
        ctx = SagaContext()
        ctx._data.update(self._data)
        ctx._nested.update(self._nested)
        return ctx

    def to_json(self) -> bytes:
        """The tagged JSON encoding (what the engine stores). Raises `SagaContextError`."""
        return orjson.dumps(encode_context(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> SagaContext:
        """Rebuild a context from `to_json` output, types intact."""
        return decode_context(orjson.loads(data))


_set_slot = object.__setattr__


def _put_nested(ctx: SagaContext, key: str, value: Any) -> None:
    """Store a value that is not a plain scalar, once it proved storable (floats finite, strings UTF-8)."""
    try:
        encode_value(value, key)
    except _Unstorable as exc:
        raise _context_error(exc, None) from None
    ctx._data[key] = value
    if type(value) is float or type(value) is str:
        ctx._nested.pop(key, None)
    else:
        ctx._nested[key] = None


#: Attribute names that belong to the mapping itself and cannot be entries set by attribute.
_RESERVED = frozenset(dir(SagaContext))
