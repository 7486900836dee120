"""Build saga definitions and instances for the pure core, and drive them with outcomes.

No I/O: everything here runs the functions of :mod:`engine.decide` on
snapshots, the way the executor does, with a clock the test controls.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from engine.decide import Recover, Run, Wait, begin_attempt, decide, record_failure, record_success
from engine.definition import Retry, Saga, StepContext
from engine.model import Failure, Instance, StepState, Transition
from engine.states import CompensationStatus, Phase, SagaState, StepKind, StepStatus

FAST = Retry(
    max_attempts=3,
    initial_delay=timedelta(milliseconds=100),
    backoff=2.0,
    max_delay=timedelta(seconds=10),
    jitter=0.1,
)
T0 = 1_000_000


def noop(ctx: StepContext) -> None:
    return None


def undo(ctx: StepContext, output: Any) -> None:
    return None


def build_saga(
    kinds: str,
    *,
    retry: Retry = FAST,
    comp_retry: Retry = FAST,
    name: str = "pure",
    timeout: timedelta = timedelta(seconds=5),
) -> Saga:
    """A saga from a shape string: ``c`` compensatable, ``n`` compensatable without a
    compensation, ``p`` pivot, ``r`` retriable; e.g. ``"ccpr"``."""
    saga = Saga(
        name, default_retry=retry, default_compensation_retry=comp_retry, default_timeout=timeout
    )
    for i, letter in enumerate(kinds):
        kind = {
            "c": StepKind.COMPENSATABLE,
            "n": None,
            "p": StepKind.PIVOT,
            "r": StepKind.RETRIABLE,
        }[letter]
        saga.add_step(f"s{i}", noop, undo if letter == "c" else None, kind=kind)
    return saga.validate()


def new_instance(defn: Saga, now: int = T0) -> Instance:
    return Instance(
        id="saga-1",
        saga_name=defn.name,
        saga_version=defn.version,
        state=SagaState.RUNNING,
        cursor=0,
        steps=tuple(StepState(i, s.name) for i, s in enumerate(defn.steps)),
        payload={},
        correlation_id="corr-1",
        created_at=now,
        updated_at=now,
        last_progress_at=now,
        next_run_at=now,
    )


def fail(message: str = "boom", *, retryable: bool = True) -> Failure:
    return Failure(message, "Traceback: ...", retryable=retryable)


TIMEOUT = Failure("timed out after 5s", timed_out=True)
ABANDONED = Failure("worker gone", abandoned=True)


@dataclass
class Driver:
    """Runs an instance through the pure core as a worker would, one outcome at a time."""

    defn: Saga
    inst: Instance
    now: int = T0
    rand: float = 0.5
    transitions: list[Transition] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)

    def begin(self) -> Run:
        """Start the attempt that is due (jumping the clock past any wait)."""
        decision = decide(self.inst, self.now)
        if isinstance(decision, Wait):
            self.now = decision.until
            decision = decide(self.inst, self.now)
        if isinstance(decision, Recover):
            self.apply(record_failure(self.inst, self.defn, self.now, ABANDONED, self.rand))
            return self.begin()
        assert isinstance(decision, Run), decision
        self.apply(begin_attempt(self.inst, self.defn, decision, self.now))
        self.runs.append(decision)
        return decision

    def succeed(self, output: Any = None) -> Transition:
        self.now += 10
        return self.apply(record_success(self.inst, self.defn, self.now, output))

    def failure(self, failure: Failure) -> Transition:
        self.now += 10
        return self.apply(record_failure(self.inst, self.defn, self.now, failure, self.rand))

    def step(self, outcome: Failure | None = None) -> Transition:
        """Begin the due attempt and give it ``outcome`` (None: success)."""
        self.begin()
        return self.succeed({"n": len(self.runs)}) if outcome is None else self.failure(outcome)

    def apply(self, transition: Transition) -> Transition:
        self.transitions.append(transition)
        self.inst = replace(transition.instance, version=self.inst.version + 1)
        return transition

    def comp_runs(self) -> list[int]:
        return [r.index for r in self.runs if r.phase is Phase.COMPENSATE]

    def action_runs(self) -> list[int]:
        return [r.index for r in self.runs if r.phase is Phase.ACTION]


def driver(kinds: str, **kw: Any) -> Driver:
    defn = build_saga(kinds, **kw)
    return Driver(defn, new_instance(defn))


def at(inst: Instance, index: int, **changes: Any) -> Instance:
    """``inst`` with step ``index`` changed."""
    return inst.with_step(replace(inst.steps[index], **changes))


__all__ = [
    "ABANDONED",
    "FAST",
    "T0",
    "TIMEOUT",
    "CompensationStatus",
    "Driver",
    "StepStatus",
    "at",
    "build_saga",
    "driver",
    "fail",
    "new_instance",
]
