"""Every error the engine raises, in one tree.

::

    SagaError
    ├── DefinitionError            a saga definition is invalid (names the saga and step)
    ├── UnknownSaga (LookupError)  no saga of that name is registered
    ├── SagaNotFound (LookupError) no instance with that id
    ├── InvalidInput (ValueError)  a payload, filter or argument is malformed
    │   └── UnknownUser (LookupError)  no console user has that name
    ├── InvalidTransition          the instance's state does not allow the operation
    ├── ConcurrencyConflict        the instance changed since the caller last read it
    ├── StepFailed                 raised by step code: a retryable failure
    │   └── NonRetryableError      raised by step code: fail now, do not retry
    │       └── ActionFenced       the guard refused an action whose compensation ran first
    └── TransportError             the queue could not be reached

Constructors take typed fields and build the message, so every message
names what was wrong and what to do about it.
"""

from __future__ import annotations


class SagaError(Exception):
    """Base of every error the engine raises on purpose."""


class DefinitionError(SagaError):
    """A saga definition is invalid; raised when the definition is built."""

    def __init__(self, saga: str, step: str | None, problem: str) -> None:
        self.saga = saga
        self.step = step
        self.problem = problem
        where = f"saga {saga!r}" + (f", step {step!r}" if step else "")
        super().__init__(f"{where}: {problem}")


class UnknownSaga(SagaError, LookupError):
    """No saga with this name is registered in the engine."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        hint = ", ".join(sorted(known)) or "none (did you pass -A/--app?)"
        super().__init__(f"unknown saga {name!r}; registered sagas: {hint}")


class SagaNotFound(SagaError, LookupError):
    """No saga instance has this id."""

    def __init__(self, saga_id: str) -> None:
        self.saga_id = saga_id
        super().__init__(f"no saga instance with id {saga_id!r}")


class InvalidInput(SagaError, ValueError):
    """A caller passed a malformed value; nothing was written."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"invalid {field}: {problem}")


class UnknownUser(InvalidInput, LookupError):
    """No console user has this name (bad input to the console, "not found" to the CLI)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__("user name", f"no user named {name!r}")


class InvalidTransition(SagaError):
    """The operation is not allowed in the instance's current state."""

    def __init__(self, saga_id: str, operation: str, state: str, why: str) -> None:
        self.saga_id = saga_id
        self.operation = operation
        self.state = state
        self.why = why
        super().__init__(f"cannot {operation} saga {saga_id} while it is {state}: {why}")


class ConcurrencyConflict(SagaError):
    """The instance's version moved on since the caller read it."""

    def __init__(self, saga_id: str, expected: int, actual: int | None, detail: str = "") -> None:
        self.saga_id = saga_id
        self.expected = expected
        self.actual = actual
        self.detail = detail
        now = "was deleted" if actual is None else f"is now at version {actual}"
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"saga {saga_id} changed since you read it: you saw version {expected}, it {now}"
            f"{extra}; reload it and decide again"
        )


class StepFailed(SagaError):
    """Raise from a step to fail this attempt; the retry policy decides what follows."""


class NonRetryableError(StepFailed):
    """Raise from a step to fail it at once, without further attempts."""


class ActionFenced(NonRetryableError):
    """The idempotency guard refused an action: the compensation of its step ran first.

    The action arrived late (its attempt had timed out, and the saga compensated
    the step, finding nothing to undo); doing it now would leave an effect
    nothing undoes, so the guard refused it and did nothing.
    """

    def __init__(self, key: str, fenced_at: int) -> None:
        self.key = key
        self.fenced_at = fenced_at
        super().__init__(
            f"action {key!r} refused: its compensation ran first (fenced at {fenced_at} ms); "
            "it arrived after its step was undone, so it did nothing"
        )


class TransportError(SagaError):
    """The message transport could not be reached or refused an operation."""
