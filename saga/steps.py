"""Step objects of the definition DSL: local, remote and conditional steps.

Steps only hold callbacks and options; running them is the execution's job. Every step delegates
``local_step`` / ``remote_step`` / ``conditional_step`` / ``commit`` back to its saga so Minos-style chains
(``Saga().remote_step(f).on_success(g).local_step(h).commit()``) read top to bottom.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from types import CoroutineType
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

from saga.context import SagaContext
from saga.errors import SagaDefinitionError
from saga.limits import MAX_DURATION_SECONDS, check_seconds
from saga.messages import SagaRequest, SagaResponse
from saga.retry import NO_RETRY, RetryPolicy
from storage.records import StepKind

if TYPE_CHECKING:
    from saga.definitions import Saga

__all__ = [
    "Condition",
    "ConditionalSagaStep",
    "ContextResult",
    "LocalCallback",
    "LocalSagaStep",
    "RemoteCallback",
    "RemoteCompensation",
    "RemoteSagaStep",
    "ReplyCallback",
    "SagaStep",
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


def _callable_name(fn: Callable[..., Any] | None) -> str | None:
    """A usable step name from a function: lambdas, partials and callables without one give ``None``."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name.isidentifier():
        return None
    return name


class SagaStep:
    """Base of all steps: its saga, position, name and the chaining shortcuts."""

    kind: ClassVar[StepKind]

    def __init__(self, saga: Saga, index: int, name: str | None) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise SagaDefinitionError(f"step name must be a non-empty string, got {name!r}")
        self._saga = saga
        #: 1-based position in its saga.
        self.index = index
        self._explicit_name = name
        self._name: str | None = name

    # -- naming ----------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Stable name: the explicit ``name=``, else the callback's ``__name__``, else ``<kind>_step_<i>``."""
        if self._name is None:
            return self._derived_name()
        return self._name

    def _primary_callback(self) -> Callable[..., Any] | None:
        return None

    def _derived_name(self) -> str:
        return _callable_name(self._primary_callback()) or f"{self.kind}_step_{self.index}"

    def _seal(self) -> None:
        """Fix the name and check the step is complete (called by ``Saga.commit``)."""
        self._name = self.name
        self._validate()

    def _validate(self) -> None:
        """Raise `SagaDefinitionError` if the step cannot run."""

    def _set_once(self, attribute: str, fn: Callable[..., Any], hook: str) -> None:
        self._saga._check_open(f"cannot set {hook} on step {self.name!r}")
        if not callable(fn):
            raise SagaDefinitionError(
                f"{hook} of step {self.name!r} must be callable, got {fn!r}", step=self.name
            )
        if getattr(self, attribute) is not None:
            raise SagaDefinitionError(f"{hook} of step {self.name!r} is already set", step=self.name)
        setattr(self, attribute, fn)

    # -- chaining back to the saga ---------------------------------------------------------------------

    def local_step(
        self,
        fn: LocalCallback | None = None,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
    ) -> LocalSagaStep:
        """Add a local step to this step's saga (see `Saga.local_step`)."""
        return self._saga.local_step(fn, name=name, retry=retry, compensation_retry=compensation_retry)

    def remote_step(
        self,
        fn: RemoteCallback | None = None,
        *,
        name: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
    ) -> RemoteSagaStep:
        """Add a remote step to this step's saga (see `Saga.remote_step`)."""
        return self._saga.remote_step(
            fn, name=name, timeout=timeout, retry=retry, compensation_retry=compensation_retry
        )

    def conditional_step(self, *, name: str | None = None) -> ConditionalSagaStep:
        """Add a conditional step to this step's saga (see `Saga.conditional_step`)."""
        return self._saga.conditional_step(name=name)

    def commit(self, fn: LocalCallback | None = None) -> Saga:
        """Seal this step's saga (see `Saga.commit`)."""
        return self._saga.commit(fn)

    @property
    def saga(self) -> Saga:
        """The saga this step belongs to."""
        return self._saga

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _check_policy(value: RetryPolicy | None, what: str, step: str) -> None:
    if value is not None and not isinstance(value, RetryPolicy):
        raise SagaDefinitionError(f"{what} of step {step!r} must be a RetryPolicy, got {value!r}", step=step)


class _ActionStep(SagaStep):
    """A step that does something (local or remote), so it has retry policies and a compensation."""

    def __init__(
        self,
        saga: Saga,
        index: int,
        name: str | None,
        fn: Callable[..., Any] | None,
        retry: RetryPolicy | None,
        compensation_retry: RetryPolicy | None,
    ) -> None:
        super().__init__(saga, index, name)
        if fn is not None:
            self._set_once("execute_fn", fn, "on_execute")
        _check_policy(retry, "retry", self.name)
        _check_policy(compensation_retry, "compensation_retry", self.name)
        self.retry: RetryPolicy = retry or NO_RETRY
        #: ``None`` means the saga's ``compensation_retry`` applies.
        self.compensation_retry = compensation_retry


class LocalSagaStep(_ActionStep):
    """A function run in the orchestrator's process.

    ``on_execute(context)`` returns a new context (or mapping), or ``None`` to keep the context it may have
    changed in place. ``on_failure(context)`` undoes it when a later step fails.
    """

    kind: ClassVar[StepKind] = "local"

    def __init__(
        self,
        saga: Saga,
        index: int,
        fn: LocalCallback | None = None,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
    ) -> None:
        self.execute_fn: LocalCallback | None = None
        self.failure_fn: LocalCallback | None = None
        super().__init__(saga, index, name, fn, retry, compensation_retry)

    def _primary_callback(self) -> Callable[..., Any] | None:
        return self.execute_fn or self.failure_fn

    def on_execute(self, fn: LocalCallback) -> LocalSagaStep:
        """Set the step's function."""
        self._set_once("execute_fn", fn, "on_execute")
        return self

    def on_failure(self, fn: LocalCallback) -> LocalSagaStep:
        """Set the compensation run when a later step fails."""
        self._set_once("failure_fn", fn, "on_failure")
        return self


class RemoteSagaStep(_ActionStep):
    """A command sent to a participant, whose reply resumes the saga.

    ``on_execute(context)`` returns the `SagaRequest`; ``on_success(context, response)`` applies a 200
    reply; ``on_error(context, response)`` handles a 400 reply (return a context to continue, raise to
    compensate); ``on_failure(context)`` returns the compensation command (or ``None`` for none).
    """

    kind: ClassVar[StepKind] = "remote"

    def __init__(
        self,
        saga: Saga,
        index: int,
        fn: RemoteCallback | None = None,
        *,
        name: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
    ) -> None:
        self.execute_fn: RemoteCallback | None = None
        self.success_fn: ReplyCallback | None = None
        self.error_fn: ReplyCallback | None = None
        self.failure_fn: RemoteCompensation | None = None
        super().__init__(saga, index, name, fn, retry, compensation_retry)
        problem = None if timeout is None else check_seconds(timeout, MAX_DURATION_SECONDS)
        if problem is not None:
            raise SagaDefinitionError(f"timeout of step {self.name!r} {problem}", step=self.name)
        #: Seconds to wait for the reply; ``None`` waits without limit (the saga deadline still applies).
        self.timeout: float | None = None if timeout is None else float(timeout)

    def _primary_callback(self) -> Callable[..., Any] | None:
        return self.execute_fn

    def _validate(self) -> None:
        if self.execute_fn is None:
            raise SagaDefinitionError(f"remote step {self.name!r} has no on_execute", step=self.name)

    def on_execute(self, fn: RemoteCallback) -> RemoteSagaStep:
        """Set the function that builds the command."""
        self._set_once("execute_fn", fn, "on_execute")
        return self

    def on_success(self, fn: ReplyCallback) -> RemoteSagaStep:
        """Set the handler of a 200 reply."""
        self._set_once("success_fn", fn, "on_success")
        return self

    def on_error(self, fn: ReplyCallback) -> RemoteSagaStep:
        """Set the handler of a 400 reply (return a context to continue, raise to compensate)."""
        self._set_once("error_fn", fn, "on_error")
        return self

    def on_failure(self, fn: RemoteCompensation) -> RemoteSagaStep:
        """Set the function that builds the compensation command."""
        self._set_once("failure_fn", fn, "on_failure")
        return self


class ConditionalSagaStep(SagaStep):
    """Runs the first sub-saga whose condition holds, else the ``else_then`` one, else nothing.

    Sub-sagas are committed `Saga` objects; their steps run inline, as if they were part of this saga
    (compensated in reverse like any other), so their step names share this saga's name space.
    """

    kind: ClassVar[StepKind] = "conditional"

    def __init__(self, saga: Saga, index: int, *, name: str | None = None) -> None:
        super().__init__(saga, index, name)
        self.branches: list[tuple[Condition, Saga]] = []
        self.else_saga: Saga | None = None

    def _check_sub_saga(self, sub: object, what: str) -> None:
        from saga.definitions import Saga

        self._saga._check_open(f"cannot add {what} to step {self.name!r}")
        if not isinstance(sub, Saga):
            raise SagaDefinitionError(
                f"{what} of step {self.name!r} needs a Saga, got {sub!r}", step=self.name
            )
        if not sub.committed:
            raise SagaDefinitionError(
                f"{what} of step {self.name!r} needs a committed Saga (call .commit() on it)", step=self.name
            )
        if sub is self._saga:
            raise SagaDefinitionError(f"{what} of step {self.name!r} cannot run its own saga", step=self.name)

    def if_then(self, condition: Condition, saga: Saga) -> ConditionalSagaStep:
        """Add a branch: run ``saga`` when ``condition(context)`` is true (first true branch wins)."""
        self._check_sub_saga(saga, "if_then")
        if not callable(condition):
            raise SagaDefinitionError(
                f"if_then condition of step {self.name!r} must be callable, got {condition!r}", step=self.name
            )
        if self.else_saga is not None:
            raise SagaDefinitionError(f"if_then after else_then in step {self.name!r}", step=self.name)
        self.branches.append((condition, saga))
        return self

    def else_then(self, saga: Saga) -> ConditionalSagaStep:
        """Set the sub-saga to run when no condition holds."""
        self._check_sub_saga(saga, "else_then")
        if self.else_saga is not None:
            raise SagaDefinitionError(f"else_then of step {self.name!r} is already set", step=self.name)
        self.else_saga = saga
        return self

    def _validate(self) -> None:
        if not self.branches:
            raise SagaDefinitionError(f"conditional step {self.name!r} has no if_then branch", step=self.name)

    def branch(self, index: int) -> Saga:
        """Sub-saga of branch ``index`` (``len(branches)`` is the ``else_then`` one)."""
        if index < len(self.branches):
            return self.branches[index][1]
        assert self.else_saga is not None
        return self.else_saga

    def sub_sagas(self) -> list[Saga]:
        """Every sub-saga, ``else_then`` last."""
        subs = [saga for _, saga in self.branches]
        if self.else_saga is not None:
            subs.append(self.else_saga)
        return subs
