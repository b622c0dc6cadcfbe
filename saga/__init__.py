"""Saga orchestration: definitions, executions, the manager and its workers."""

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
from saga.messages import SagaRequest, SagaResponse, SagaResponseStatus
from storage import SagaStatus

__all__ = [
    "MalformedMessageError",
    "SagaBusinessError",
    "SagaBusyError",
    "SagaConfigError",
    "SagaContextError",
    "SagaDefinitionError",
    "SagaError",
    "SagaExecutionError",
    "SagaRequest",
    "SagaResponse",
    "SagaResponseStatus",
    "SagaStateError",
    "SagaStatus",
    "SagaStepError",
    "UnknownSagaDefinitionError",
]
