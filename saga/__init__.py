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
from saga.participant import CommandContext, ParticipantStats, SagaParticipant
from storage import SagaStatus

__all__ = [
    "CommandContext",
    "MalformedMessageError",
    "ParticipantStats",
    "SagaBusinessError",
    "SagaBusyError",
    "SagaConfigError",
    "SagaContextError",
    "SagaDefinitionError",
    "SagaError",
    "SagaExecutionError",
    "SagaParticipant",
    "SagaRequest",
    "SagaResponse",
    "SagaResponseStatus",
    "SagaStateError",
    "SagaStatus",
    "SagaStepError",
    "UnknownSagaDefinitionError",
]
