"""`Saga`: the definition DSL (Minos-compatible), sealed and validated by ``commit()``.

A definition is plain data plus callbacks: it does no I/O and holds no execution state, so one committed
`Saga` serves any number of concurrent executions. Executions refer to it by ``(name, version)`` through
the manager's registry, never by import path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from saga.errors import SagaDefinitionError
from saga.limits import MAX_DURATION_SECONDS, check_seconds
from saga.retry import NO_RETRY, RetryPolicy
from saga.steps import (
    ConditionalSagaStep,
    LocalCallback,
    LocalSagaStep,
    RemoteCallback,
    RemoteSagaStep,
    SagaStep,
)

__all__ = ["Saga"]


class Saga:
    """A saga definition: an ordered list of steps, sealed by `commit`.

    Args:
        name: Registry name; may be left out Minos-style and given by ``SagaManager.register(saga,
            name=...)``.
        version: Definition version; executions resume with the version they started with.
        deadline: Seconds the whole saga may take; past it, whatever ran is compensated.
        compensation_retry: Retry policy of compensations of steps that set none.

    Example:
        >>> saga = (
        ...     Saga("create_order")
        ...     .remote_step(reserve_stock).on_success(store_reservation).on_failure(release_stock)
        ...     .local_step(confirm_order)
        ...     .commit()
        ... )
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        version: int = 1,
        deadline: float | None = None,
        compensation_retry: RetryPolicy | None = None,
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
            raise SagaDefinitionError(f"{what}: saga {self._name or '<unnamed>'!r} is already committed")

    def local_step(
        self,
        fn: LocalCallback | None = None,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
    ) -> LocalSagaStep:
        """Add a step that runs ``fn(context)`` in this process.

        Args:
            fn: The step function (or set it later with ``.on_execute``).
            name: Step name; defaults to ``fn.__name__``.
            retry: Tries (with backoff) before the saga compensates.
            compensation_retry: Tries of this step's ``on_failure``.
        """
        self._check_open("cannot add a step")
        step = LocalSagaStep(
            self, len(self._steps) + 1, fn, name=name, retry=retry, compensation_retry=compensation_retry
        )
        self._steps.append(step)
        return step

    def remote_step(
        self,
        fn: RemoteCallback | None = None,
        *,
        name: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
    ) -> RemoteSagaStep:
        """Add a step that sends the command ``fn(context)`` returns and waits for the reply.

        Args:
            fn: Builds the `SagaRequest` (or set it later with ``.on_execute``).
            name: Step name; defaults to ``fn.__name__``.
            timeout: Seconds to wait for the reply before replaying or compensating.
            retry: Total sends allowed for timeouts (replays) and 500 replies (new requests).
            compensation_retry: Tries of this step's compensation command.
        """
        self._check_open("cannot add a step")
        step = RemoteSagaStep(
            self,
            len(self._steps) + 1,
            fn,
            name=name,
            timeout=timeout,
            retry=retry,
            compensation_retry=compensation_retry,
        )
        self._steps.append(step)
        return step

    def conditional_step(self, *, name: str | None = None) -> ConditionalSagaStep:
        """Add a step that picks a sub-saga with ``.if_then(condition, saga)`` / ``.else_then(saga)``."""
        self._check_open("cannot add a step")
        step = ConditionalSagaStep(self, len(self._steps) + 1, name=name)
        self._steps.append(step)
        return step

    def commit(self, fn: LocalCallback | None = None) -> Saga:
        """Seal and validate the definition; ``fn``, if given, becomes a final local step named "commit".

        Raises:
            SagaDefinitionError: Already committed, no steps, an incomplete step or a duplicate step name
                (sub-sagas included); the message names the step.
        """
        self._check_open("cannot commit")
        if fn is not None:
            self.local_step(fn, name="commit")
        if not self._steps:
            raise SagaDefinitionError(f"saga {self._name or '<unnamed>'!r} has no steps")
        for step in self._steps:
            step._seal()
        seen: dict[str, str] = {}
        for owner, step_name in self._all_names():
            if step_name in seen:
                where = "" if seen[step_name] == owner else f" (in {seen[step_name]} and {owner})"
                raise SagaDefinitionError(
                    f"duplicate step name {step_name!r}{where}; give one of them another name=",
                    step=step_name,
                )
            seen[step_name] = owner
        self._committed = True
        return self

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
