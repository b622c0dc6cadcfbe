"""``minos.saga``'s public names, for a service ported from Minos by changing its imports.

``from minos.saga import Saga, SagaContext, ...`` becomes ``from saga.compat.minos import Saga,
SagaContext, ...``. Most names are kafka-saga's own classes, which already take Minos's forms (chains,
steps made on their own, ``Saga(steps=...)``, ``validate()``, ``SagaStatus.Finished``, ``from_raw``,
``SagaExecution.from_definition``/``execute``/``rollback``, the ``...Exception`` classes). What would
clash with kafka-saga's own API lives here only:

* `SagaResponse` takes Minos's positional form ``SagaResponse(content, related_services, status,
  uuid=...)``; built without a request id, ``SagaManager.run(response=...)`` applies it to the request the
  execution awaits.
* `Saga` (and the step classes it makes) hand reply callbacks a Minos view of the reply, whose
  ``content()`` is a coroutine as in Minos (kafka-saga's `saga.SagaResponse.content` is an attribute), and
  take Minos's ``parameters=`` / keyword parameters of ``on_execute(fn, parameters, **kwargs)``.
* Minos's other exception names, as aliases of the kafka-saga errors that mean the same.

``docs/porting-from-minos.md`` lists every name and the deliberate differences.
"""

from __future__ import annotations

import uuid as _uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from saga.context import SagaContext
from saga.definitions import Saga as _Saga
from saga.definitions import callback_key
from saga.errors import (
    AlreadyCommittedException,
    AlreadyOnSagaException,
    EmptySagaException,
    EmptySagaStepException,
    MultipleElseThenException,
    MultipleOnErrorException,
    MultipleOnExecuteException,
    MultipleOnFailureException,
    MultipleOnSuccessException,
    SagaBusinessError,
    SagaDefinitionError,
    SagaError,
    SagaExecutionAlreadyExecutedException,
    SagaExecutionError,
    SagaNotCommittedException,
    SagaNotDefinedException,
    SagaPausedExecutionStepException,
    SagaRollbackExecutionException,
    SagaStepError,
    SagaStepException,
    UndefinedOnExecuteException,
)
from saga.execution import SagaExecution
from saga.manager import SagaManager
from saga.messages import AWAITED_REQUEST_ID, SagaRequest, SagaResponseStatus
from saga.messages import SagaResponse as _SagaResponse
from saga.steps import (
    ConditionalSagaStep,
    ElseThenAlternative,
    IfThenAlternative,
    SagaStep,
)
from saga.steps import LocalSagaStep as _LocalSagaStep
from saga.steps import RemoteSagaStep as _RemoteSagaStep
from storage import ExecutionNotFoundError, SagaStatus

__all__ = [
    "AlreadyCommittedException",
    "AlreadyOnSagaException",
    "ConditionalSagaStep",
    "ElseThenAlternative",
    "EmptySagaException",
    "EmptySagaStepException",
    "ExecutorException",
    "IfThenAlternative",
    "LocalSagaStep",
    "MultipleElseThenException",
    "MultipleOnErrorException",
    "MultipleOnExecuteException",
    "MultipleOnFailureException",
    "MultipleOnSuccessException",
    "OrderPrecedenceException",
    "RemoteSagaStep",
    "Saga",
    "SagaContext",
    "SagaException",
    "SagaExecution",
    "SagaExecutionAlreadyExecutedException",
    "SagaExecutionException",
    "SagaExecutionNotFoundException",
    "SagaFailedCommitCallbackException",
    "SagaFailedExecutionException",
    "SagaFailedExecutionStepException",
    "SagaManager",
    "SagaNotCommittedException",
    "SagaNotDefinedException",
    "SagaPausedExecutionStepException",
    "SagaRequest",
    "SagaResponse",
    "SagaResponseException",
    "SagaResponseStatus",
    "SagaRollbackExecutionException",
    "SagaRollbackExecutionStepException",
    "SagaStatus",
    "SagaStep",
    "SagaStepException",
    "SagaStepExecutionException",
    "SagaView",
    "UndefinedOnExecuteException",
]

# -- exceptions: Minos's names for kafka-saga's errors -------------------------------------------------

#: Root of every saga error.
SagaException = SagaError
#: Root of errors about executions.
SagaExecutionException = SagaError
#: ``run(raise_on_error=True)`` and ``execute()`` raise it when the saga ends ERRORED or DEAD_LETTER.
SagaFailedExecutionException = SagaExecutionError
SagaFailedExecutionStepException = SagaExecutionError
SagaFailedCommitCallbackException = SagaExecutionError
#: A step callback raised.
SagaStepExecutionException = SagaStepError
SagaRollbackExecutionStepException = SagaStepError
ExecutorException = SagaStepError
#: A participant refused the command (a 400 reply).
SagaResponseException = SagaBusinessError
#: ``SagaManager.get`` / storage ``load`` of an unknown id.
SagaExecutionNotFoundException = ExecutionNotFoundError
#: Minos's step-order error; kafka-saga reports every definition problem as a `SagaDefinitionError`.
OrderPrecedenceException = SagaDefinitionError


# -- replies -------------------------------------------------------------------------------------------


class SagaResponse(_SagaResponse):
    """A reply in Minos's form: ``SagaResponse(content, related_services, status, uuid=execution_id)``.

    It is a `saga.SagaResponse` (``content`` an attribute); ``related_services`` holds the replying
    service, which autocommit sends commit or reject. Without ``request_id`` it answers the request the
    execution awaits when given to ``SagaManager.run(response=...)``.

    Raises:
        TypeError: ``status`` is not a status code.
        ValueError: ``related_services`` names more than one service (a reply comes from one).
    """

    def __init__(
        self,
        content: Any = None,
        related_services: Iterable[str] | None = None,
        status: SagaResponseStatus | int | None = None,
        uuid: _uuid.UUID | None = None,
        *,
        execution_id: _uuid.UUID | None = None,
        request_id: _uuid.UUID | None = None,
        service_name: str | None = None,
    ) -> None:
        services = sorted(set(related_services or ()))
        if len(services) > 1:
            raise ValueError(
                f"related_services: a reply comes from one service, got {services}; give the replying one"
            )
        if status is None:
            status = SagaResponseStatus.SUCCESS
        elif not isinstance(status, SagaResponseStatus) and isinstance(status, int):
            status = _KNOWN.get(status, status)
        fields = {
            "content": content,
            "status": status,
            "execution_id": execution_id or uuid or _uuid.uuid4(),
            "request_id": request_id or AWAITED_REQUEST_ID,
            "service_name": service_name or (services[0] if services else None),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        self.__post_init__()


_KNOWN = {member.value: member for member in SagaResponseStatus}


class _Reply:
    """What a Minos reply callback is handed: the reply with ``content()`` a coroutine, as in Minos."""

    __slots__ = ("_response",)

    def __init__(self, response: _SagaResponse) -> None:
        self._response = response

    async def content(self, **kwargs: Any) -> Any:
        """The reply's content (Minos's coroutine form)."""
        return self._response.content

    @property
    def ok(self) -> bool:
        """Whether the participant succeeded (200)."""
        return self._response.ok

    @property
    def status(self) -> SagaResponseStatus | int:
        """The reply status."""
        return self._response.status

    @property
    def uuid(self) -> _uuid.UUID:
        """The execution id."""
        return self._response.execution_id

    @property
    def related_services(self) -> set[str]:
        """The replying service, as a set."""
        return self._response.related_services

    @property
    def response(self) -> _SagaResponse:
        """The kafka-saga reply itself."""
        return self._response

    def __repr__(self) -> str:
        return f"SagaResponse({self._response.content!r}, {self.status!r}, {self.related_services!r})"


SagaView = _Reply


class _Callback:
    """A Minos callback: called with the context, a Minos view of the reply, and its ``parameters``.

    Keeps the wrapped function's ``__name__`` (step names derive from it) and compares equal to another
    wrapper of the same function and parameters, so two equal definitions stay equal.
    """

    __slots__ = ("__name__", "fn", "parameters", "reply")

    def __init__(self, fn: Callable[..., Any], parameters: Mapping[str, Any], *, reply: bool) -> None:
        if not callable(fn):
            raise SagaDefinitionError(f"a step callback must be callable, got {fn!r}")
        self.fn = fn
        self.parameters = dict(parameters)
        self.reply = reply
        self.__name__ = getattr(fn, "__name__", "callback")

    def __call__(self, context: SagaContext, *args: Any) -> Any:
        if self.reply and args:
            args = (_Reply(args[0]), *args[1:])
        return self.fn(context, *args, **self.parameters)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Callback)
            and self.reply == other.reply
            and self.parameters == other.parameters
            and callback_key(self.fn) == callback_key(other.fn)
        )

    def __hash__(self) -> int:
        return hash((self.reply, self.__name__))


def _wrap(fn: Any, parameters: Mapping[str, Any] | None, kwargs: Mapping[str, Any], *, reply: bool) -> Any:
    if fn is None or (not reply and not parameters and not kwargs):
        return fn
    return _Callback(fn, {**(parameters or {}), **kwargs}, reply=reply)


class LocalSagaStep(_LocalSagaStep):
    """kafka-saga's local step, taking Minos's ``parameters=`` and keyword parameters of a callback."""

    def on_execute(
        self, fn: Callable[..., Any], parameters: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> LocalSagaStep:
        super().on_execute(_wrap(fn, parameters, kwargs, reply=False))
        return self

    def on_failure(
        self, fn: Callable[..., Any], parameters: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> LocalSagaStep:
        super().on_failure(_wrap(fn, parameters, kwargs, reply=False))
        return self


class RemoteSagaStep(_RemoteSagaStep):
    """kafka-saga's remote step whose reply callbacks get Minos's reply view (``await response.content()``)
    and that takes Minos's ``parameters=`` and keyword parameters of a callback."""

    def on_execute(
        self, fn: Callable[..., Any], parameters: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> RemoteSagaStep:
        super().on_execute(_wrap(fn, parameters, kwargs, reply=False))
        return self

    def on_success(
        self, fn: Callable[..., Any], parameters: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> RemoteSagaStep:
        super().on_success(_wrap(fn, parameters, kwargs, reply=True))
        return self

    def on_error(
        self, fn: Callable[..., Any], parameters: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> RemoteSagaStep:
        super().on_error(_wrap(fn, parameters, kwargs, reply=True))
        return self

    def on_failure(
        self, fn: Callable[..., Any], parameters: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> RemoteSagaStep:
        super().on_failure(_wrap(fn, parameters, kwargs, reply=False))
        return self


class Saga(_Saga):
    """kafka-saga's `saga.Saga`, making the Minos-flavoured `LocalSagaStep` and `RemoteSagaStep`.

    ``Saga()`` is nameless, as in Minos: a manager names it from its steps when it first runs it.
    """

    local_step_type = LocalSagaStep
    remote_step_type = RemoteSagaStep
