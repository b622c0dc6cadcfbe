"""Saga orchestration: definitions, executions, the manager and its workers."""

from saga.config import SagaConfig, load_config
from saga.container import SagaContainer, create_container
from saga.context import SagaContext
from saga.definitions import Saga
from saga.errors import (
    MalformedMessageError,
    SagaBusinessError,
    SagaBusyError,
    SagaConfigError,
    SagaContextError,
    SagaDefinitionError,
    SagaError,
    SagaExecutionError,
    SagaStateError,
    SagaStepError,
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
from storage import SagaStatus

__all__ = [
    "CommandContext",
    "MalformedMessageError",
    "ParticipantStats",
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
    "SagaExecutionError",
    "SagaHooks",
    "SagaManager",
    "SagaParticipant",
    "SagaRecoveryWorker",
    "SagaRegistry",
    "SagaRequest",
    "SagaResponse",
    "SagaResponseStatus",
    "SagaStateError",
    "SagaStatus",
    "SagaStepError",
    "UnknownSagaDefinitionError",
    "create_container",
    "load_config",
    "recover_saga",
]
