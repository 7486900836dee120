"""Commands and replies as they travel on the bus: a few fields an operator greps for
(``saga_id``, ``correlation_id``, ``command`` or ``outcome``) plus one JSON ``body``
with the rest (docs/redis.md lists it all). Parsing refuses what the store would:
a malformed entry raises :class:`BadMessage`, and its reader sets it aside.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from engine.definition import StepContext
from engine.model import Failure
from engine.states import Phase
from engine.store import dumps, has_nul
from engine.transport.redis_doorbells import is_saga_id

#: Version of the field layout of commands and replies.
WIRE_VERSION = "1"


#: Step indexes and attempt numbers are INTEGER columns.
_INT32 = 2**31 - 1


class BadMessage(ValueError):
    """An entry on a stream is not a well-formed command or reply."""


class Outcome(StrEnum):
    """How a participant says an attempt ended."""

    SUCCESS = "success"
    RETRY = "retry"  # a failure the retry policy may try again
    FAIL = "fail"  # a failure no retry will mend


@dataclass(frozen=True)
class Command:
    """Run one attempt of one side (action or compensation) of a remote step."""

    command: str
    saga_id: str
    saga_name: str
    step: str
    step_index: int
    phase: Phase
    attempt: int
    idempotency_key: str
    correlation_id: str
    business_key: str | None
    deadline_at: int
    sent_at: int
    payload: Any
    outputs: dict[str, Any]
    #: For a compensation: the action's output (None when unknown, e.g. it timed out).
    output: Any = None

    @property
    def service(self) -> str:
        return self.command.split(".", 1)[0]

    def context(self) -> StepContext:
        """What the participant's handler is given: the same as an in-process step's."""
        return StepContext(
            saga_id=self.saga_id,
            saga_name=self.saga_name,
            correlation_id=self.correlation_id,
            business_key=self.business_key,
            payload=self.payload,
            outputs=self.outputs,
            step=self.step,
            phase=self.phase,
            attempt=self.attempt,
            idempotency_key=self.idempotency_key,
        )

    def to_fields(self) -> dict[str, str]:
        body = {
            "saga_name": self.saga_name,
            "step": self.step,
            "step_index": self.step_index,
            "phase": str(self.phase),
            "attempt": self.attempt,
            "idempotency_key": self.idempotency_key,
            "business_key": self.business_key,
            "deadline_at": self.deadline_at,
            "sent_at": self.sent_at,
            "payload": self.payload,
            "outputs": self.outputs,
            "output": self.output,
        }
        return {
            "v": WIRE_VERSION,
            "command": self.command,
            "saga_id": self.saga_id,
            "correlation_id": self.correlation_id,
            "body": dumps(body),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Command:
        """Parse an entry; raises :class:`BadMessage` saying what is wrong with it."""
        f = _Fields(fields)
        command, saga_id, correlation_id = f.text("command"), f.saga_id(), f.text("correlation_id")
        body = f.body()
        return cls(
            command=command,
            saga_id=saga_id,
            correlation_id=correlation_id,
            saga_name=body.text("saga_name"),
            step=body.text("step"),
            step_index=body.number("step_index", at_most=_INT32),
            phase=body.phase(),
            attempt=body.number("attempt", at_most=_INT32),
            idempotency_key=body.text("idempotency_key"),
            business_key=body.optional_text("business_key"),
            deadline_at=body.number("deadline_at"),
            sent_at=body.number("sent_at"),
            payload=body.get("payload"),
            outputs=body.mapping("outputs"),
            output=body.get("output"),
        )


@dataclass(frozen=True)
class Reply:
    """A participant's answer to one :class:`Command`."""

    saga_id: str
    step: str
    step_index: int
    phase: Phase
    attempt: int
    correlation_id: str
    command: str
    outcome: Outcome
    output: Any = None
    error: str | None = None
    traceback: str | None = None
    #: The participant process that handled it (its consumer name).
    participant: str = ""
    #: When its handler started and ended, epoch ms (0: unknown).
    started_at: int = 0
    finished_at: int = 0

    @classmethod
    def to(cls, command: Command, outcome: Outcome, **fields: Any) -> Reply:
        """The reply to ``command``: its correlation fields, then ``fields``."""
        return cls(
            saga_id=command.saga_id,
            step=command.step,
            step_index=command.step_index,
            phase=command.phase,
            attempt=command.attempt,
            correlation_id=command.correlation_id,
            command=command.command,
            outcome=outcome,
            **fields,
        )

    def to_fields(self) -> dict[str, str]:
        body = {
            "step": self.step,
            "step_index": self.step_index,
            "phase": str(self.phase),
            "attempt": self.attempt,
            "command": self.command,
            "output": self.output,
            "error": self.error,
            "traceback": self.traceback,
            "participant": self.participant,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        return {
            "v": WIRE_VERSION,
            "saga_id": self.saga_id,
            "correlation_id": self.correlation_id,
            "outcome": str(self.outcome),
            "body": dumps(body),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Reply:
        """Parse an entry; raises :class:`BadMessage` saying what is wrong with it."""
        f = _Fields(fields)
        outcome = f.text("outcome")
        if outcome not in Outcome.__members__.values():
            raise BadMessage(f"outcome {outcome[:40]!r} is none of {', '.join(Outcome)}")
        saga_id, correlation_id = f.saga_id(), f.text("correlation_id")
        body = f.body()
        reply = cls(
            saga_id=saga_id,
            correlation_id=correlation_id,
            outcome=Outcome(outcome),
            step=body.text("step"),
            step_index=body.number("step_index", at_most=_INT32),
            phase=body.phase(),
            attempt=body.number("attempt", at_most=_INT32),
            command=body.text("command"),
            output=body.get("output"),
            error=body.optional_text("error"),
            traceback=body.optional_text("traceback"),
            participant=body.optional_text("participant") or "",
            started_at=body.number("started_at", default=0),
            finished_at=body.number("finished_at", default=0),
        )
        if reply.outcome is not Outcome.SUCCESS and not reply.error:
            raise BadMessage(f"a {reply.outcome} reply needs an error")
        return reply

    def failure(self) -> Failure:
        return Failure(
            self.error or "failed", self.traceback, retryable=self.outcome is Outcome.RETRY
        )


class _Fields:
    """Typed access to an entry's raw fields; every problem is a :class:`BadMessage`."""

    def __init__(self, fields: Mapping[bytes, bytes]) -> None:
        self.fields = fields
        version = self.optional("v")
        if version != WIRE_VERSION:
            raise BadMessage(f"wire version {version!r}, this code reads {WIRE_VERSION!r}")

    def optional(self, name: str) -> str | None:
        raw = self.fields.get(name.encode())
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadMessage(f"{name} is not UTF-8 text: {raw[:60]!r}") from None

    def text(self, name: str) -> str:
        value = self.optional(name)
        if not value:
            names = ", ".join(k.decode("utf-8", "replace") for k in self.fields) or "none"
            raise BadMessage(f"no {name} field (fields: {names})")
        return value

    def saga_id(self) -> str:
        value = self.text("saga_id")
        if not is_saga_id(value):
            raise BadMessage(f"saga_id {value[:60]!r} is not a saga id (a UUID)")
        return value.lower()

    def body(self) -> _Body:
        text = self.text("body")
        try:
            value = json.loads(text, parse_constant=_no_constant)
        except ValueError as exc:
            raise BadMessage(f"body is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise BadMessage("body is not a JSON object")
        # What the store cannot keep is refused here, where it can be set aside,
        # rather than failing the transaction that records a whole batch.
        if "\\u0000" in text and has_nul(value):
            raise BadMessage("body holds the NUL character (U+0000), which the store cannot keep")
        return _Body(value)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class _Body:
    """Typed access to the JSON body of an entry."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def optional_text(self, name: str) -> str | None:
        value = self.values.get(name)
        if value is not None and not isinstance(value, str):
            raise BadMessage(f"body.{name} is not text")
        return value

    def text(self, name: str) -> str:
        value = self.optional_text(name)
        if not value:
            raise BadMessage(f"body.{name} is missing")
        return value

    def number(self, name: str, default: int | None = None, *, at_most: int = 2**63 - 1) -> int:
        value = self.values.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadMessage(f"body.{name} {value!r} is not a whole number")
        if not 0 <= value <= at_most:
            raise BadMessage(f"body.{name} {value} is out of range (0 to {at_most})")
        return value

    def phase(self) -> Phase:
        value = self.values.get("phase")
        if not isinstance(value, str) or value not in Phase.__members__.values():
            raise BadMessage(f"body.phase {value!r} is neither action nor compensate")
        return Phase(value)

    def mapping(self, name: str) -> dict[str, Any]:
        value = self.values.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise BadMessage(f"body.{name} is not a JSON object")
        return value
