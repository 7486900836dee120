"""A durable saga engine: define sagas in plain Python, run them on SQLite or PostgreSQL."""

from importlib import metadata as _metadata

from engine.definition import NO_RETRY, Retry, Saga, StepContext, StepHandle, StuckPolicy
from engine.errors import (
    ActionFenced,
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

try:
    #: The installed distribution's version: pyproject.toml is its one source.
    __version__ = _metadata.version("saga-engine")
except _metadata.PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "NO_RETRY",
    "Action",
    "ActionFenced",
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
