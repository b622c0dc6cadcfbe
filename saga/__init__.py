"""Saga orchestration: definitions, executions, the manager and its workers."""

from saga.config import SagaConfig, load_config
from saga.container import SagaContainer, create_container
from saga.context import SagaContext
from saga.definitions import Saga
from saga.errors import (
    AlreadyCommittedException,
    AlreadyOnSagaException,
    EmptySagaException,
    EmptySagaStepException,
    MalformedMessageError,
    MultipleElseThenException,
    MultipleOnErrorException,
    MultipleOnExecuteException,
    MultipleOnFailureException,
    MultipleOnSuccessException,
    SagaBusinessError,
    SagaBusyError,
    SagaConfigError,
    SagaContextError,
    SagaDefinitionError,
    SagaError,
    SagaExecutionAlreadyExecutedException,
    SagaExecutionError,
    SagaNotCommittedException,
    SagaNotDefinedException,
    SagaPausedExecutionStepException,
    SagaRollbackExecutionException,
    SagaStateError,
    SagaStepError,
    SagaStepException,
    UndefinedOnExecuteException,
    UnknownSagaDefinitionError,
)
from saga.execution import SagaExecution
from saga.hooks import SagaEvent, SagaHooks
from saga.manager import SagaManager
from saga.messages import SagaRequest, SagaResponse, SagaResponseStatus
from saga.participant import CommandContext, ParticipantStats, SagaParticipant
from saga.recovery import SagaRecoveryWorker, recover_saga
from saga.registry import SagaRegistry
from saga.retry import RetryPolicy
from saga.steps import (
    ConditionalSagaStep,
    ElseThenAlternative,
    IfThenAlternative,
    LocalSagaStep,
    RemoteSagaStep,
    SagaStep,
)
from storage import SagaStatus

__all__ = [
    "AlreadyCommittedException",
    "AlreadyOnSagaException",
    "CommandContext",
    "ConditionalSagaStep",
    "ElseThenAlternative",
    "EmptySagaException",
    "EmptySagaStepException",
    "IfThenAlternative",
    "LocalSagaStep",
    "MalformedMessageError",
    "MultipleElseThenException",
    "MultipleOnErrorException",
    "MultipleOnExecuteException",
    "MultipleOnFailureException",
    "MultipleOnSuccessException",
    "ParticipantStats",
    "RemoteSagaStep",
    "RetryPolicy",
    "Saga",
    "SagaBusinessError",
    "SagaBusyError",
    "SagaConfig",
    "SagaConfigError",
    "SagaContainer",
    "SagaContext",
    "SagaContextError",
    "SagaDefinitionError",
    "SagaError",
    "SagaEvent",
    "SagaExecution",
    "SagaExecutionAlreadyExecutedException",
    "SagaExecutionError",
    "SagaHooks",
    "SagaManager",
    "SagaNotCommittedException",
    "SagaNotDefinedException",
    "SagaParticipant",
    "SagaPausedExecutionStepException",
    "SagaRecoveryWorker",
    "SagaRegistry",
    "SagaRequest",
    "SagaResponse",
    "SagaResponseStatus",
    "SagaRollbackExecutionException",
    "SagaStateError",
    "SagaStatus",
    "SagaStep",
    "SagaStepError",
    "SagaStepException",
    "UndefinedOnExecuteException",
    "UnknownSagaDefinitionError",
    "create_container",
    "load_config",
    "recover_saga",
]
