"""A durable saga engine: define sagas in plain Python, run them on SQLite or PostgreSQL."""

from engine.definition import NO_RETRY, Retry, Saga, StepContext, StepHandle, StuckPolicy
from engine.errors import (
    ConcurrencyConflict,
    DefinitionError,
    InvalidInput,
    InvalidTransition,
    NonRetryableError,
    SagaError,
    SagaNotFound,
    StepFailed,
    TransportError,
    UnknownSaga,
)
from engine.idempotency import IdempotencyGuard
from engine.interventions import Action
from engine.model import Instance
from engine.queries import InstanceFilter, Queries
from engine.runtime import SagaEngine, Started
from engine.settings import Settings
from engine.states import CompensationStatus, Phase, SagaState, StepKind, StepStatus

__all__ = [
    "NO_RETRY",
    "Action",
    "CompensationStatus",
    "ConcurrencyConflict",
    "DefinitionError",
    "IdempotencyGuard",
    "Instance",
    "InstanceFilter",
    "InvalidInput",
    "InvalidTransition",
    "NonRetryableError",
    "Phase",
    "Queries",
    "Retry",
    "Saga",
    "SagaEngine",
    "SagaError",
    "SagaNotFound",
    "SagaState",
    "Settings",
    "Started",
    "StepContext",
    "StepFailed",
    "StepHandle",
    "StepKind",
    "StepStatus",
    "StuckPolicy",
    "TransportError",
    "UnknownSaga",
]
