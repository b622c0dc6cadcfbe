"""`Saga`: the definition DSL (Minos-compatible), sealed and validated by ``commit()``.

A definition is plain data plus callbacks: it does no I/O and holds no execution state, so one committed
`Saga` serves any number of concurrent executions. Executions refer to it by ``(name, version)`` through
the manager's registry, never by import path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, TypeVar

from saga.errors import (
    AlreadyCommittedException,
    AlreadyOnSagaException,
    EmptySagaException,
    SagaDefinitionError,
    SagaNotCommittedException,
)
from saga.limits import MAX_DURATION_SECONDS, check_seconds
from saga.retry import NO_RETRY, RetryPolicy
from saga.steps import (
    ConditionalSagaStep,
    LocalCallback,
    LocalSagaStep,
    RemoteCallback,
    RemoteSagaStep,
    SagaStep,
    not_a_saga,
)

_Step = TypeVar("_Step", bound=SagaStep)

__all__ = ["Saga", "callback_key"]


class Saga:
    """A saga definition: an ordered list of steps, sealed by `commit`.

    Args:
        name: Registry name; may be left out Minos-style and given by ``SagaManager.register(saga,
            name=...)``.
        version: Definition version; executions resume with the version they started with.
        deadline: Seconds the whole saga may take; past it, whatever ran is compensated.
        compensation_retry: Retry policy of compensations of steps that set none.
        steps: Steps made on their own (``RemoteSagaStep(on_execute=...)``), Minos-style; a saga given
            steps is committed at once unless ``committed=False``.
        committed: Commit at once (``True``), or leave open (``False``) a saga given ``steps``.

    Example:
        >>> saga = (
        ...     Saga("create_order")
        ...     .remote_step(reserve_stock).on_success(store_reservation).on_failure(release_stock)
        ...     .local_step(confirm_order)
        ...     .commit()
        ... )
    """

    #: Step classes `local_step` / `remote_step` make (``saga.compat.minos`` gives its own).
    local_step_type: ClassVar[type[LocalSagaStep]] = LocalSagaStep
    remote_step_type: ClassVar[type[RemoteSagaStep]] = RemoteSagaStep

    def __init__(
        self,
        name: str | None = None,
        *,
        version: int = 1,
        deadline: float | None = None,
        compensation_retry: RetryPolicy | None = None,
        steps: Iterable[SagaStep] | None = None,
        committed: bool | None = None,
    ) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise SagaDefinitionError(f"saga name must be a non-empty string, got {name!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise SagaDefinitionError(f"saga version must be a positive int, got {version!r}")
        problem = None if deadline is None else check_seconds(deadline, MAX_DURATION_SECONDS)
        if problem is not None:
            raise SagaDefinitionError(f"saga deadline {problem}")
        if compensation_retry is not None and not isinstance(compensation_retry, RetryPolicy):
            raise SagaDefinitionError(f"compensation_retry must be a RetryPolicy, got {compensation_retry!r}")
        self._name = name
        self.version = version
        self.deadline: float | None = None if deadline is None else float(deadline)
        self.compensation_retry: RetryPolicy = compensation_retry or NO_RETRY
        self._steps: list[SagaStep] = []
        self._committed = False
        given = list(steps or ())
        for step in given:
            if not isinstance(step, SagaStep):
                raise SagaDefinitionError(f"steps= needs SagaStep objects, got {not_a_saga(step)}")
            self._attach(step)
        # As in Minos, a saga given its steps is committed, unless committed=False says otherwise.
        if committed or (committed is None and given):
            self.commit()

    # -- properties ------------------------------------------------------------------------------------

    @property
    def name(self) -> str | None:
        """Registry name (``None`` until named)."""
        return self._name

    @property
    def committed(self) -> bool:
        """Whether `commit` sealed the definition."""
        return self._committed

    @property
    def steps(self) -> tuple[SagaStep, ...]:
        """The steps, in order."""
        return tuple(self._steps)

    def _set_name(self, name: str) -> None:
        """Name a nameless saga (used by the registry)."""
        if not isinstance(name, str) or not name:
            raise SagaDefinitionError(f"saga name must be a non-empty string, got {name!r}")
        if self._name is not None and self._name != name:
            raise SagaDefinitionError(f"saga {self._name!r} cannot be renamed {name!r}")
        self._name = name

    def derived_name(self) -> str:
        """A stable name for a nameless saga, from its step names (same definition, same name)."""
        digest = hashlib.sha1(",".join(self.step_names()).encode(), usedforsecurity=False).hexdigest()
        return f"saga_{digest[:12]}"

    # -- building --------------------------------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._committed:
            raise AlreadyCommittedException(
                f"{what}: saga {self._name or '<unnamed>'!r} is already committed"
            )

    def _attach(self, step: SagaStep) -> None:
        """Append a step object to this saga (it must belong to no other)."""
        self._check_open("cannot add a step")
        if step._saga is not None:
            raise AlreadyOnSagaException(
                f"step {step.name!r} already belongs to saga {step._saga.name or '<unnamed>'!r}",
                step=step.name,
            )
        step._saga = self
        step.index = len(self._steps) + 1
        self._steps.append(step)

    def _add(self, cls: type[_Step], given: object, make: Callable[[], _Step]) -> _Step:
        if isinstance(given, SagaStep):
            if not isinstance(given, cls):
                raise SagaDefinitionError(
                    f"a {type(given).__name__} cannot be added as a {cls.kind} step", step=given.name
                )
            self._attach(given)
            return given
        self._check_open("cannot add a step")
        step = make()
        self._attach(step)
        return step

    def local_step(
        self,
        fn: LocalCallback | LocalSagaStep | None = None,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
    ) -> LocalSagaStep:
        """Add a step that runs ``fn(context)`` in this process.

        Args:
            fn: The step function (or set it later with ``.on_execute``), or a `LocalSagaStep` made on
                its own.
            name: Step name; defaults to ``fn.__name__``.
            retry: Tries (with backoff) before the saga compensates.
            compensation_retry: Tries of this step's ``on_failure``.
        """
        return self._add(
            LocalSagaStep,
            fn,
            lambda: self.local_step_type(
                fn,  # type: ignore[arg-type]
                name=name,
                retry=retry,
                compensation_retry=compensation_retry,
            ),
        )

    def remote_step(
        self,
        fn: RemoteCallback | RemoteSagaStep | None = None,
        *,
        name: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
    ) -> RemoteSagaStep:
        """Add a step that sends the command ``fn(context)`` returns and waits for the reply.

        Args:
            fn: Builds the `SagaRequest` (or set it later with ``.on_execute``), or a `RemoteSagaStep`
                made on its own.
            name: Step name; defaults to ``fn.__name__``.
            timeout: Seconds to wait for the reply before replaying or compensating.
            retry: Total sends allowed for timeouts (replays) and 500 replies (new requests).
            compensation_retry: Tries of this step's compensation command.
        """
        return self._add(
            RemoteSagaStep,
            fn,
            lambda: self.remote_step_type(
                fn,  # type: ignore[arg-type]
                name=name,
                timeout=timeout,
                retry=retry,
                compensation_retry=compensation_retry,
            ),
        )

    def conditional_step(
        self, step: ConditionalSagaStep | None = None, *, name: str | None = None
    ) -> ConditionalSagaStep:
        """Add a step that picks a sub-saga with ``.if_then(condition, saga)`` / ``.else_then(saga)``."""
        return self._add(ConditionalSagaStep, step, lambda: ConditionalSagaStep(name=name))

    def commit(self, fn: LocalCallback | None = None) -> Saga:
        """Seal and validate the definition; ``fn``, if given, becomes a final local step named "commit".

        Step names are fixed here: an explicit ``name=`` must be unique in the saga and its branches; a
        name derived from a callback that another step already has gets a ``_2``, ``_3``, ... suffix
        (Minos reuses one callback in several steps and names none). A branch's sub-saga keeps the names
        its own commit gave it, so one sub-saga may serve several branches.

        Raises:
            AlreadyCommittedException: Already committed.
            EmptySagaException: No steps.
            SagaStepException: An incomplete step (its subclass says what is missing).
            SagaDefinitionError: Two steps have the same explicit name; the message names the step.
        """
        self._check_open("cannot commit")
        if fn is not None:
            self.local_step(fn, name="commit")
        self.validate(committed=False)
        taken: dict[str, str] = {}
        for step in self._steps:
            if isinstance(step, ConditionalSagaStep):
                for i, sub in enumerate(step.sub_sagas()):
                    for _, sub_name in sub._all_names():
                        taken.setdefault(sub_name, f"branch {i + 1} of {step.name!r}")
        for step in self._steps:
            explicit = step.explicit_name
            if explicit is None:
                continue
            if explicit in taken:
                where = "" if taken[explicit] == "the saga" else f" (in the saga and {taken[explicit]})"
                raise SagaDefinitionError(
                    f"duplicate step name {explicit!r}{where}; give one of them another name=",
                    step=explicit,
                )
            taken[explicit] = "the saga"
        for step in self._steps:
            name = step.explicit_name
            if name is None:
                base = name = step.name
                n = 1
                while name in taken:
                    n += 1
                    name = f"{base}_{n}"
                taken[name] = "the saga"
            step._seal(name)
        self._committed = True
        return self

    def validate(self, *, committed: bool = True) -> None:
        """Check the definition without changing it (Minos's ``validate``).

        Raises:
            EmptySagaException: No steps.
            SagaStepException: A step is incomplete (its subclass says what is missing).
            SagaNotCommittedException: The saga is not committed (checked last, when ``committed``).
        """
        if not self._steps:
            raise EmptySagaException(f"saga {self._name or '<unnamed>'!r} has no steps")
        for step in self._steps:
            step.validate()
            if isinstance(step, ConditionalSagaStep):
                for sub in step.sub_sagas():
                    sub.validate()
        if committed and not self._committed:
            raise SagaNotCommittedException(
                f"saga {self._name or '<unnamed>'!r} is not committed: call .commit() after its last step"
            )

    def same_definition(self, other: Saga) -> bool:
        """Whether ``other`` is built the same way: same version, options, steps and callbacks.

        Two equal nameless ``Saga()`` definitions (built by one factory function, say) are one definition
        to a manager.
        """
        return (
            self.version == other.version
            and self.deadline == other.deadline
            and self.compensation_retry == other.compensation_retry
            and self._shape() == other._shape()
        )

    def _shape(self) -> list[Any]:
        shape: list[Any] = []
        for step in self._steps:
            entry: list[Any] = [type(step), step.name]
            if isinstance(step, ConditionalSagaStep):
                entry.extend((callback_key(c), sub._shape()) for c, sub in step.branches)
                entry.append(None if step.else_saga is None else step.else_saga._shape())
            elif isinstance(step, LocalSagaStep | RemoteSagaStep):
                entry.extend((step.retry, step.compensation_retry))
                for attribute in ("execute_fn", "failure_fn", "success_fn", "error_fn", "timeout"):
                    value = getattr(step, attribute, None)
                    entry.append(callback_key(value) if callable(value) else value)
            shape.append(entry)
        return shape

    # -- reading ---------------------------------------------------------------------------------------

    def _all_names(self, owner: str = "the saga") -> Iterator[tuple[str, str]]:
        for step in self._steps:
            yield owner, step.name
            if isinstance(step, ConditionalSagaStep):
                for i, sub in enumerate(step.sub_sagas()):
                    yield from sub._all_names(f"branch {i + 1} of {step.name!r}")

    def step_names(self) -> list[str]:
        """Every step name, sub-sagas included, depth first."""
        return [name for _, name in self._all_names()]

    def __repr__(self) -> str:
        state = "committed" if self._committed else "open"
        return f"<Saga {self._name or '<unnamed>'!r} v{self.version} {len(self._steps)} steps, {state}>"


def callback_key(fn: Callable[..., Any]) -> object:
    """What makes two callbacks the same: the object itself (and its ``==``), or, for closure-free
    functions (lambdas a factory makes afresh on every call), their code and defaults."""
    code = getattr(fn, "__code__", None)
    if code is None or getattr(fn, "__closure__", None):
        return fn
    return (code, getattr(fn, "__defaults__", None), getattr(fn, "__kwdefaults__", None))
