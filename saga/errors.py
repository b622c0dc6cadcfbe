"""The orchestration layer's errors, rooted at `SagaError`.

Errors carry structured attributes (``execution_id``, ``step``) so callers and logs need not parse
messages. Transport and storage failures keep their own roots (``broker.BrokerError``,
``storage.StorageError``) because those packages cannot depend on this one; both carry ``retriable``::

    SagaError                         (execution_id, step)
    ├── SagaDefinitionError           a definition is invalid (names the step)
    │   ├── EmptySagaException            the saga has no steps
    │   ├── AlreadyCommittedException     the saga is committed: no more steps, hooks or commits
    │   ├── SagaNotCommittedException     the saga is run or registered without ``.commit()``
    │   └── SagaStepException             a step is invalid
    │       ├── EmptySagaStepException        the step has no callback at all
    │       ├── UndefinedOnExecuteException   the step has no ``on_execute``
    │       ├── MultipleOnExecuteException    ``on_execute`` set twice (and On{Failure,Success,Error},
    │       │                                 ElseThen: ``MultipleOnFailureException``, ...)
    │       ├── AlreadyOnSagaException        the step object already belongs to a saga
    │       └── SagaNotDefinedException       a free-standing step is chained before joining a saga
    ├── SagaContextError              a context value cannot be stored (names the key and the step)
    ├── SagaExecutionError            raised by run(raise_on_error=True) when a saga ends ERRORED/DEAD_LETTER
    ├── SagaStepError                 a step callback failed (wraps the callback's exception)
    ├── SagaBusinessError             raised by a participant handler: the reply is ERROR (400)
    ├── UnknownSagaDefinitionError    (name, version) is not registered in the manager
    ├── SagaBusyError                 another worker holds the execution's claim (retriable)
    ├── SagaStateError                the operation does not fit the execution's status
    │   ├── SagaExecutionAlreadyExecutedException   ``execute()`` on a finished execution
    │   └── SagaRollbackExecutionException          ``rollback()`` twice, or a compensation failed
    ├── SagaPausedExecutionStepException  ``SagaExecution.execute()`` stopped at a remote step
    ├── MalformedMessageError         a message cannot be decoded (names the field and why)
    │   └── UnsupportedProtocolError  a message speaks a newer wire-format version than this receiver
    └── SagaConfigError               a configuration value is wrong (names the key and why)

    broker.BrokerError  (retriable)      storage.StorageError  (retriable)

The ``...Exception`` classes carry Minos's names, so code ported from ``minos.saga`` catches what it
caught there; ``saga.compat.minos`` adds Minos's other names as aliases of the classes above.
"""

from __future__ import annotations

import uuid

__all__ = [
    "AlreadyCommittedException",
    "AlreadyOnSagaException",
    "EmptySagaException",
    "EmptySagaStepException",
    "MalformedMessageError",
    "MultipleElseThenException",
    "MultipleOnErrorException",
    "MultipleOnExecuteException",
    "MultipleOnFailureException",
    "MultipleOnSuccessException",
    "SagaBusinessError",
    "SagaBusyError",
    "SagaConfigError",
    "SagaContextError",
    "SagaDefinitionError",
    "SagaError",
    "SagaExecutionAlreadyExecutedException",
    "SagaExecutionError",
    "SagaNotCommittedException",
    "SagaNotDefinedException",
    "SagaPausedExecutionStepException",
    "SagaRollbackExecutionException",
    "SagaStateError",
    "SagaStepError",
    "SagaStepException",
    "UndefinedOnExecuteException",
    "UnknownSagaDefinitionError",
    "UnsupportedProtocolError",
]


class SagaError(Exception):
    """Root of every error raised by the orchestration layer.

    Attributes:
        execution_id: The execution concerned, when there is one.
        step: The step concerned, when there is one.
        retriable: Whether repeating the same operation later may succeed.
    """

    retriable: bool = False

    def __init__(
        self,
        message: str,
        *,
        execution_id: uuid.UUID | None = None,
        step: str | None = None,
    ) -> None:
        super().__init__(message)
        self.execution_id = execution_id
        self.step = step


class SagaDefinitionError(SagaError):
    """A saga definition is invalid; raised by ``commit()`` or when registering."""


class EmptySagaException(SagaDefinitionError):
    """The saga has no steps (Minos's name)."""


class AlreadyCommittedException(SagaDefinitionError):
    """The saga is committed: it takes no more steps, hooks or commits (Minos's name)."""


class SagaNotCommittedException(SagaDefinitionError):
    """The saga is run or registered before ``.commit()`` sealed it (Minos's name)."""


class SagaStepException(SagaDefinitionError):
    """A step is invalid (Minos's name); ``step`` names it."""


class EmptySagaStepException(SagaStepException):
    """The step has no callback at all (Minos's name)."""


class UndefinedOnExecuteException(SagaStepException):
    """The step has no ``on_execute`` (Minos's name)."""


class MultipleOnExecuteException(SagaStepException):
    """``on_execute`` is set twice on one step (Minos's name)."""


class MultipleOnFailureException(SagaStepException):
    """``on_failure`` is set twice on one step (Minos's name)."""


class MultipleOnSuccessException(SagaStepException):
    """``on_success`` is set twice on one step (Minos's name)."""


class MultipleOnErrorException(SagaStepException):
    """``on_error`` is set twice on one step (Minos's name)."""


class MultipleElseThenException(SagaStepException):
    """``else_then`` is set twice on one conditional step (Minos's name)."""


class AlreadyOnSagaException(SagaStepException):
    """A step object is added to a saga while it belongs to one (Minos's name)."""


class SagaNotDefinedException(SagaStepException):
    """A free-standing step is chained (``.local_step()``, ``.commit()``, ...) before it joins a saga."""


class SagaContextError(SagaError, TypeError):
    """A context value is not storable (not JSON, UUID, datetime, date, Decimal or containers of them)."""

    def __init__(self, message: str, *, key: str, step: str | None = None) -> None:
        super().__init__(message, step=step)
        self.key = key


class SagaExecutionError(SagaError):
    """A saga ended ``ERRORED`` or ``DEAD_LETTER`` and the caller asked for errors to be raised.

    Attributes:
        status: Final status of the execution.
        error: The structured error stored with the execution.
    """

    def __init__(
        self,
        message: str,
        *,
        execution_id: uuid.UUID | None = None,
        step: str | None = None,
        status: str | None = None,
        error: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message, execution_id=execution_id, step=step)
        self.status = status
        self.error = error


class SagaStepError(SagaError):
    """A step callback raised; the original exception is chained as ``__cause__``."""


class SagaBusinessError(SagaError):
    """A participant refused a command for a business reason; replied as ``ERROR`` (400)."""


class UnknownSagaDefinitionError(SagaError, LookupError):
    """No definition with this name and version is registered; the execution is left untouched."""

    def __init__(self, name: str, version: int, *, execution_id: uuid.UUID | None = None) -> None:
        super().__init__(
            f"no saga definition {name!r} version {version} is registered", execution_id=execution_id
        )
        self.name = name
        self.version = version


class SagaBusyError(SagaError):
    """Another worker holds the claim on this execution; try again once its lease ends."""

    retriable = True


class SagaStateError(SagaError):
    """The requested operation does not apply to the execution in its current status."""


class SagaExecutionAlreadyExecutedException(SagaStateError):
    """``SagaExecution.execute()`` on an execution that already ended (Minos's name)."""


class SagaRollbackExecutionException(SagaStateError):
    """``SagaExecution.rollback()`` on an execution already rolled back, or a compensation failed."""


class SagaPausedExecutionStepException(SagaError):
    """``SagaExecution.execute()`` reached a remote step: the execution waits for its reply (Minos's name).

    The commands to send are in the execution's ``outbox``; ``execute(response=...)`` goes on.
    """


class MalformedMessageError(SagaError, ValueError):
    """A message could not be decoded.

    Attributes:
        field: The header or payload field at fault.
        reason: Why it was refused.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"malformed message: {field}: {reason}")
        self.field = field
        self.reason = reason


class UnsupportedProtocolError(MalformedMessageError):
    """A message carries a ``saga-protocol-version`` newer than the one this receiver speaks.

    Receivers dead-letter such a message (reason ``unsupported_protocol``) instead of guessing what a newer
    format means.

    Attributes:
        version: The version the message declares.
        supported: The newest version this receiver speaks.
    """

    def __init__(self, field: str, version: int, supported: int) -> None:
        super().__init__(field, f"version {version} is newer than the supported version {supported}")
        self.version = version
        self.supported = supported


class SagaConfigError(SagaError, ValueError):
    """A configuration value is wrong.

    Attributes:
        key: Dotted path of the offending key (``broker.kafka.bootstrap_servers``).
        problem: What is wrong with it.
    """

    def __init__(self, key: str, problem: str, *, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {problem}")
        self.key = key
        self.problem = problem
        self.source = source
