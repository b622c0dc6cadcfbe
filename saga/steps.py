"""Step objects of the definition DSL: local, remote and conditional steps.

Steps only hold callbacks and options; running them is the execution's job. Every step delegates
``local_step`` / ``remote_step`` / ``conditional_step`` / ``commit`` back to its saga so Minos-style chains
(``Saga().remote_step(f).on_success(g).local_step(h).commit()``) read top to bottom.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from saga.callbacks import (
    Condition,
    ContextResult,
    LocalCallback,
    RemoteCallback,
    RemoteCompensation,
    ReplyCallback,
    invoke,
)
from saga.errors import (
    EmptySagaStepException,
    MultipleElseThenException,
    MultipleOnErrorException,
    MultipleOnExecuteException,
    MultipleOnFailureException,
    MultipleOnSuccessException,
    SagaDefinitionError,
    SagaNotCommittedException,
    SagaNotDefinedException,
    SagaStepException,
    UndefinedOnExecuteException,
)
from saga.limits import MAX_DURATION_SECONDS, check_seconds
from saga.retry import NO_RETRY, RetryPolicy
from storage.records import StepKind

if TYPE_CHECKING:
    from saga.definitions import Saga

__all__ = [
    "Condition",
    "ConditionalSagaStep",
    "ContextResult",
    "ElseThenAlternative",
    "IfThenAlternative",
    "LocalCallback",
    "LocalSagaStep",
    "RemoteCallback",
    "RemoteCompensation",
    "RemoteSagaStep",
    "ReplyCallback",
    "SagaStep",
    "invoke",
    "not_a_saga",
]


def _callable_name(fn: Callable[..., Any] | None) -> str | None:
    """A usable step name from a function: lambdas, partials and callables without one give ``None``."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name.isidentifier():
        return None
    return name


class SagaStep:
    """Base of all steps: its saga, position, name and the chaining shortcuts.

    A step is made by its saga (``saga.local_step(fn)``) or on its own, Minos-style
    (``RemoteSagaStep(on_execute=fn, on_success=g)``), and then added with ``saga.remote_step(step)`` or
    ``Saga(steps=[...])``. A step belongs to one saga at a time.
    """

    kind: ClassVar[StepKind]

    def __init__(self, saga: Saga | None, name: str | None) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise SagaDefinitionError(f"step name must be a non-empty string, got {name!r}")
        self._saga: Saga | None = None
        #: 1-based position in its saga (0 until it joins one).
        self.index = 0
        self._explicit_name = name
        self._name: str | None = name
        if saga is not None:
            saga._attach(self)

    # -- naming ----------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Stable name: the explicit ``name=``, else the callback's ``__name__``, else ``<kind>_step_<i>``.

        A derived name that another step of the saga already has gets a ``_2``, ``_3``, ... suffix at
        commit, so one callback may serve several steps, as in Minos, where steps have no names.
        """
        if self._name is None:
            return self._derived_name()
        return self._name

    @property
    def explicit_name(self) -> str | None:
        """The ``name=`` given, if any."""
        return self._explicit_name

    def _primary_callback(self) -> Callable[..., Any] | None:
        return None

    def _derived_name(self) -> str:
        return _callable_name(self._primary_callback()) or f"{self.kind}_step_{self.index}"

    def _seal(self, name: str) -> None:
        """Check the step is complete and fix its name (called by ``Saga.commit``)."""
        self.validate()
        self._name = name

    def validate(self) -> None:
        """Raise a `SagaStepException` subclass if the step cannot run (Minos's ``validate``)."""

    def _check_open(self, what: str) -> None:
        if self._saga is not None:
            self._saga._check_open(what)

    def _set_once(
        self, attribute: str, fn: Callable[..., Any], hook: str, twice: type[SagaStepException]
    ) -> None:
        self._check_open(f"cannot set {hook} on step {self.name!r}")
        if not callable(fn):
            raise SagaDefinitionError(
                f"{hook} of step {self.name!r} must be callable, got {fn!r}", step=self.name
            )
        if getattr(self, attribute) is not None:
            raise twice(f"{hook} of step {self.name!r} is already set", step=self.name)
        setattr(self, attribute, fn)

    # -- chaining back to the saga ---------------------------------------------------------------------

    @property
    def saga(self) -> Saga:
        """The saga this step belongs to.

        Raises:
            SagaNotDefinedException: The step was made on its own and has not joined a saga yet.
        """
        if self._saga is None:
            raise SagaNotDefinedException(
                f"step {self.name!r} belongs to no saga yet; add it with saga.{self.kind}_step(step)",
                step=self.name,
            )
        return self._saga

    def local_step(
        self,
        fn: LocalCallback | LocalSagaStep | None = None,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
    ) -> LocalSagaStep:
        """Add a local step to this step's saga (see `Saga.local_step`)."""
        return self.saga.local_step(fn, name=name, retry=retry, compensation_retry=compensation_retry)

    def remote_step(
        self,
        fn: RemoteCallback | RemoteSagaStep | None = None,
        *,
        name: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
    ) -> RemoteSagaStep:
        """Add a remote step to this step's saga (see `Saga.remote_step`)."""
        return self.saga.remote_step(
            fn, name=name, timeout=timeout, retry=retry, compensation_retry=compensation_retry
        )

    def conditional_step(
        self, step: ConditionalSagaStep | None = None, *, name: str | None = None
    ) -> ConditionalSagaStep:
        """Add a conditional step to this step's saga (see `Saga.conditional_step`)."""
        return self.saga.conditional_step(step, name=name)

    def commit(self, fn: LocalCallback | None = None) -> Saga:
        """Seal this step's saga (see `Saga.commit`)."""
        return self.saga.commit(fn)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _check_policy(value: RetryPolicy | None, what: str, step: str) -> None:
    if value is not None and not isinstance(value, RetryPolicy):
        raise SagaDefinitionError(f"{what} of step {step!r} must be a RetryPolicy, got {value!r}", step=step)


class _ActionStep(SagaStep):
    """A step that does something (local or remote), so it has retry policies and a compensation."""

    execute_fn: Callable[..., Any] | None
    failure_fn: Callable[..., Any] | None

    def __init__(
        self,
        saga: Saga | None,
        name: str | None,
        retry: RetryPolicy | None,
        compensation_retry: RetryPolicy | None,
    ) -> None:
        super().__init__(saga, name)
        self.retry: RetryPolicy = NO_RETRY
        #: ``None`` means the saga's ``compensation_retry`` applies.
        self.compensation_retry: RetryPolicy | None = None
        self._policies = (retry, compensation_retry)

    def _set_policies(self) -> None:
        """Check and set the retry policies, once the callbacks (and so the step's name) are known."""
        retry, compensation_retry = self._policies
        _check_policy(retry, "retry", self.name)
        _check_policy(compensation_retry, "compensation_retry", self.name)
        self.retry = retry or NO_RETRY
        self.compensation_retry = compensation_retry

    def _primary_callback(self) -> Callable[..., Any] | None:
        return self.execute_fn

    def validate(self) -> None:
        if self.execute_fn is not None:
            return
        if self.failure_fn is None and not self._has_reply_hooks():
            raise EmptySagaStepException(
                f"{self.kind} step {self.name!r} has no callback at all: give it an on_execute",
                step=self.name,
            )
        raise UndefinedOnExecuteException(
            f"{self.kind} step {self.name!r} has no on_execute (pass the function to "
            f"{self.kind}_step(fn) or call .on_execute(fn))",
            step=self.name,
        )

    def _has_reply_hooks(self) -> bool:
        return False


class LocalSagaStep(_ActionStep):
    """A function run in the orchestrator's process.

    ``on_execute(context)`` returns a new context (or mapping), or ``None`` to keep the context it may have
    changed in place. ``on_failure(context)`` undoes it when a later step fails.
    """

    kind: ClassVar[StepKind] = "local"

    def __init__(
        self,
        on_execute: LocalCallback | None = None,
        on_failure: LocalCallback | None = None,
        *,
        saga: Saga | None = None,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
    ) -> None:
        self.execute_fn: LocalCallback | None = None
        self.failure_fn: LocalCallback | None = None
        super().__init__(None, name, retry, compensation_retry)
        if on_execute is not None:
            self.on_execute(on_execute)
        if on_failure is not None:
            self.on_failure(on_failure)
        self._set_policies()
        if saga is not None:
            saga._attach(self)

    def on_execute(self, fn: LocalCallback) -> LocalSagaStep:
        """Set the step's function."""
        self._set_once("execute_fn", fn, "on_execute", MultipleOnExecuteException)
        return self

    def on_failure(self, fn: LocalCallback) -> LocalSagaStep:
        """Set the compensation run when a later step fails."""
        self._set_once("failure_fn", fn, "on_failure", MultipleOnFailureException)
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
        on_execute: RemoteCallback | None = None,
        on_success: ReplyCallback | None = None,
        on_error: ReplyCallback | None = None,
        on_failure: RemoteCompensation | None = None,
        *,
        saga: Saga | None = None,
        name: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
    ) -> None:
        self.execute_fn: RemoteCallback | None = None
        self.success_fn: ReplyCallback | None = None
        self.error_fn: ReplyCallback | None = None
        self.failure_fn: RemoteCompensation | None = None
        super().__init__(None, name, retry, compensation_retry)
        if on_execute is not None:
            self.on_execute(on_execute)
        if on_success is not None:
            self.on_success(on_success)
        if on_error is not None:
            self.on_error(on_error)
        if on_failure is not None:
            self.on_failure(on_failure)
        self._set_policies()
        problem = None if timeout is None else check_seconds(timeout, MAX_DURATION_SECONDS)
        if problem is not None:
            raise SagaDefinitionError(f"timeout of step {self.name!r} {problem}", step=self.name)
        #: Seconds to wait for the reply; ``None`` waits without limit (the saga deadline still applies).
        self.timeout: float | None = None if timeout is None else float(timeout)
        if saga is not None:
            saga._attach(self)

    def _has_reply_hooks(self) -> bool:
        return self.success_fn is not None or self.error_fn is not None

    def on_execute(self, fn: RemoteCallback) -> RemoteSagaStep:
        """Set the function that builds the command."""
        self._set_once("execute_fn", fn, "on_execute", MultipleOnExecuteException)
        return self

    def on_success(self, fn: ReplyCallback) -> RemoteSagaStep:
        """Set the handler of a 200 reply."""
        self._set_once("success_fn", fn, "on_success", MultipleOnSuccessException)
        return self

    def on_error(self, fn: ReplyCallback) -> RemoteSagaStep:
        """Set the handler of a 400 reply (return a context to continue, raise to compensate)."""
        self._set_once("error_fn", fn, "on_error", MultipleOnErrorException)
        return self

    def on_failure(self, fn: RemoteCompensation) -> RemoteSagaStep:
        """Set the function that builds the compensation command."""
        self._set_once("failure_fn", fn, "on_failure", MultipleOnFailureException)
        return self


@dataclass(frozen=True, slots=True)
class IfThenAlternative:
    """A branch of a `ConditionalSagaStep`: run ``saga`` when ``condition(context)`` is true."""

    condition: Condition
    saga: Saga

    def validate(self) -> None:
        """Check the branch's saga (Minos's ``validate``)."""
        self.saga.validate()


@dataclass(frozen=True, slots=True)
class ElseThenAlternative:
    """The branch of a `ConditionalSagaStep` run when no condition holds."""

    saga: Saga

    def validate(self) -> None:
        """Check the branch's saga (Minos's ``validate``)."""
        self.saga.validate()


class ConditionalSagaStep(SagaStep):
    """Runs the first sub-saga whose condition holds, else the ``else_then`` one, else nothing.

    Sub-sagas are committed `Saga` objects; their steps run inline, as if they were part of this saga
    (compensated in reverse like any other). One sub-saga may serve several branches.
    """

    kind: ClassVar[StepKind] = "conditional"

    def __init__(
        self,
        if_then: IfThenAlternative | Iterable[IfThenAlternative] | None = None,
        else_then: ElseThenAlternative | None = None,
        *,
        saga: Saga | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(None, name)
        self.branches: list[tuple[Condition, Saga]] = []
        self.else_saga: Saga | None = None
        alternatives = [if_then] if isinstance(if_then, IfThenAlternative) else list(if_then or ())
        for alternative in alternatives:
            if not isinstance(alternative, IfThenAlternative):
                raise SagaDefinitionError(
                    f"if_then of step {self.name!r} needs IfThenAlternative objects, got {alternative!r}",
                    step=self.name,
                )
            self.if_then(alternative.condition, alternative.saga)
        if else_then is not None:
            if not isinstance(else_then, ElseThenAlternative):
                raise SagaDefinitionError(
                    f"else_then of step {self.name!r} needs an ElseThenAlternative, got {else_then!r}",
                    step=self.name,
                )
            self.else_then(else_then.saga)
        if saga is not None:
            saga._attach(self)

    @property
    def if_then_alternatives(self) -> list[IfThenAlternative]:
        """The ``if_then`` branches, in order (Minos's view of `branches`)."""
        return [IfThenAlternative(condition, sub) for condition, sub in self.branches]

    @property
    def else_then_alternative(self) -> ElseThenAlternative | None:
        """The ``else_then`` branch, if set."""
        return None if self.else_saga is None else ElseThenAlternative(self.else_saga)

    def _check_sub_saga(self, sub: object, what: str) -> None:
        from saga.definitions import Saga

        self._check_open(f"cannot add {what} to step {self.name!r}")
        if not isinstance(sub, Saga):
            raise SagaDefinitionError(
                f"{what} of step {self.name!r} needs a Saga, got {not_a_saga(sub)}", step=self.name
            )
        if not sub.committed:
            raise SagaNotCommittedException(
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
            raise MultipleElseThenException(f"else_then of step {self.name!r} is already set", step=self.name)
        self.else_saga = saga
        return self

    def validate(self) -> None:
        if not self.branches and self.else_saga is None:
            raise EmptySagaStepException(
                f"conditional step {self.name!r} has no if_then nor else_then branch", step=self.name
            )

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


def not_a_saga(obj: object) -> str:
    """How to name ``obj`` where a `Saga` is expected, with the fix when it is a step of an open chain.

    ``Saga("x").local_step(f)`` without ``.commit()`` evaluates to the last step, not the saga.
    """
    if isinstance(obj, SagaStep):
        owner = obj._saga
        where = "" if owner is None else f" of saga {owner.name or '<unnamed>'!r}"
        return (
            f"a {type(obj).__name__} (step {obj.name!r}{where}), not a Saga: "
            "end the chain with .commit(), which returns the saga"
        )
    return f"{type(obj).__name__} {obj!r}"[:200]
