"""Callback types of the definition DSL and `invoke`, which calls a sync or async callback."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from types import CoroutineType
from typing import Any, TypeAlias

from saga.context import SagaContext
from saga.messages import SagaRequest, SagaResponse

__all__ = [
    "Condition",
    "ContextResult",
    "LocalCallback",
    "RemoteCallback",
    "RemoteCompensation",
    "ReplyCallback",
    "invoke",
]

#: What a context-returning callback may return: a new context, a mapping, or ``None`` (keep the context).
ContextResult: TypeAlias = "SagaContext | Mapping[str, Any] | None"
LocalCallback: TypeAlias = Callable[["SagaContext"], "ContextResult | Awaitable[ContextResult]"]
RemoteCallback: TypeAlias = Callable[["SagaContext"], "SagaRequest | Awaitable[SagaRequest]"]
ReplyCallback: TypeAlias = Callable[["SagaContext", SagaResponse], "ContextResult | Awaitable[ContextResult]"]
RemoteCompensation: TypeAlias = Callable[
    ["SagaContext"], "SagaRequest | Awaitable[SagaRequest | None] | None"
]
Condition: TypeAlias = Callable[["SagaContext"], "bool | Awaitable[bool]"]


#: Callback results that are never awaitable: `invoke` skips the awaitable check (an ABC instance check,
#: the dearest part of a call) for them.
_PLAIN_RESULTS: frozenset[type] = frozenset({SagaContext, SagaRequest, dict, bool, type(None)})


async def invoke(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a sync or async callback and return its result."""
    result = fn(*args)
    t = type(result)
    if t in _PLAIN_RESULTS:
        return result
    if t is CoroutineType or inspect.isawaitable(result):
        return await result
    return result
