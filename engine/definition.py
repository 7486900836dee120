"""Saga definitions: plain Python objects, validated when they are built.

A definition says what to run; it never touches the store or the queue.
The decorators only build frozen :class:`StepDef` objects through
:meth:`Saga.add_step`, which checks each addition at once, so a bad saga
fails at import time with a :class:`DefinitionError` naming saga and step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, overload

from engine.errors import DefinitionError, NonRetryableError
from engine.states import Phase, StepKind

if TYPE_CHECKING:
    from engine.store.connection import Connection

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Retry:
    """When and how often a failed attempt is tried again.

    Attempt ``n`` (1-based) that fails is followed, after
    ``min(initial_delay * backoff ** (n - 1), max_delay)`` give or take
    ``jitter`` (a fraction), by attempt ``n + 1``, up to ``max_attempts``.
    Exceptions of a ``non_retryable`` type (and :class:`NonRetryableError`)
    end the step at once.
    """

    max_attempts: int = 3
    initial_delay: timedelta = timedelta(seconds=1)
    backoff: float = 2.0
    max_delay: timedelta = timedelta(seconds=60)
    jitter: float = 0.1
    non_retryable: tuple[type[BaseException], ...] = ()

    def problem(self) -> str | None:
        """Why this policy is unusable, or None when it is fine."""
        if self.max_attempts < 1:
            return f"max_attempts must be at least 1, got {self.max_attempts}"
        if self.initial_delay < timedelta(0) or self.max_delay < timedelta(0):
            return "retry delays cannot be negative"
        if self.backoff < 1.0:
            return f"backoff must be 1.0 or more, got {self.backoff}"
        if not 0.0 <= self.jitter <= 1.0:
            return f"jitter is a fraction between 0 and 1, got {self.jitter}"
        return None

    def delay_ms(self, attempt: int, rand: float) -> int:
        """The wait after failed attempt ``attempt``; ``rand`` in [0, 1) spreads it."""
        initial = self.initial_delay.total_seconds()
        try:
            base = initial * self.backoff ** max(attempt - 1, 0)
        except OverflowError:  # a long retry budget: the cap below applies anyway
            base = float("inf") if initial > 0 else 0.0
        capped = min(base, self.max_delay.total_seconds())
        spread = 1.0 + self.jitter * (2.0 * rand - 1.0)
        return max(int(capped * spread * 1000), 0)

    def is_retryable(self, exc: BaseException) -> bool:
        return not isinstance(exc, (NonRetryableError, *self.non_retryable))


NO_RETRY = Retry(max_attempts=1)


class StuckPolicy(StrEnum):
    """What the stuck sweep does, besides flagging, with an instance that stopped progressing."""

    ALERT = "alert"  # flag it (timeline event, metric, console tab) and leave it to a person
    RETRY = "retry"  # also retry its current step (or compensation) once, as an operator would
    COMPENSATE = "compensate"  # also force-compensate it, as an operator would


#: What a remote step's command name looks like: ``service`` or ``service.name``.
COMMAND_NAME = re.compile(r"^[A-Za-z0-9_-]{1,50}(\.[A-Za-z0-9_.-]{1,100})?$")


@dataclass(frozen=True)
class Remote:
    """A step a participant service carries out: commands sent over the command stream.

    ``action`` and ``compensation`` are command names such as ``"hotel.reserve"``;
    the part before the first dot names the service, whose participant
    processes read the stream ``<prefix>:commands:<service>``.
    """

    action: str
    compensation: str | None = None

    @property
    def service(self) -> str:
        return self.action.split(".", 1)[0]

    def command(self, phase: Phase) -> str | None:
        """The command that runs ``phase`` of the step (None: nothing to undo)."""
        return self.action if phase is Phase.ACTION else self.compensation


@dataclass(frozen=True)
class StepContext:
    """What a step's action or compensation is given."""

    saga_id: str
    saga_name: str
    correlation_id: str
    business_key: str | None
    payload: Any
    outputs: Mapping[str, Any]
    step: str
    phase: Phase
    attempt: int
    idempotency_key: str
    # Set for transactional steps: the store's connection inside the
    # transaction that also records the step's result.
    connection: Connection | None = None


Action = Callable[[StepContext], Any]
Compensation = Callable[[StepContext, Any], Any]


@dataclass(frozen=True)
class StepDef:
    """One step of a saga, frozen once added."""

    name: str
    action: Action
    compensation: Compensation | None
    kind: StepKind
    timeout: timedelta
    retry: Retry
    compensation_retry: Retry
    transactional: bool = False
    expected_duration: timedelta | None = None
    explicit_kind: bool = False
    #: Set for a remote step: a participant service runs it (see :class:`Remote`).
    remote: Remote | None = None
    #: Set for a step that waits for an external event of this name (a signal).
    signal: str | None = None

    @property
    def external(self) -> bool:
        """True when the outcome comes from outside the worker (a reply or a signal)."""
        return self.remote is not None or self.signal is not None


class StepHandle:
    """What ``@saga.step`` returns: attach a compensation, or call the action."""

    def __init__(self, saga: Saga, name: str) -> None:
        self._saga = saga
        self.name = name

    def compensate(self, fn: Compensation) -> Compensation:
        """Decorator: ``fn(ctx, output)`` undoes this step; ``output`` is None if unknown."""
        self._saga.set_compensation(self.name, fn)
        return fn

    @property
    def definition(self) -> StepDef:
        return self._saga.step_named(self.name)

    def __call__(self, ctx: StepContext) -> Any:
        return self.definition.action(ctx)


@dataclass
class Saga:
    """A named, versioned, ordered list of steps.

    Build it with ``@saga.step(...)`` decorators or :meth:`add_step`; every
    addition is checked at once. :meth:`validate` runs the checks that need
    the whole list, and the engine calls it when the saga is registered.
    """

    name: str
    version: int = 1
    default_timeout: timedelta = timedelta(seconds=30)
    default_retry: Retry = field(default_factory=Retry)
    default_compensation_retry: Retry = field(default_factory=lambda: Retry(max_attempts=5))
    stuck_grace: timedelta = timedelta(minutes=5)
    #: How long a step is expected to take when it does not say (None: its timeout).
    default_expected_duration: timedelta | None = None
    #: What the stuck sweep does with an instance of this saga that stopped progressing.
    stuck_policy: StuckPolicy = StuckPolicy.ALERT
    #: Automatic retries of a dead-lettered instance by the sweeper: ``max_attempts`` is
    #: the limit per instance, the delays the wait after each dead letter. None: never.
    dead_letter_retry: Retry | None = None
    _steps: list[StepDef] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name or ""):
            raise DefinitionError(
                str(self.name), None, "a saga name is letters, digits, '_', '.', '-' (max 100)"
            )
        if self.version < 1:
            raise DefinitionError(self.name, None, f"version must be 1 or more, not {self.version}")
        self._check_sweep_settings()

    def _check_sweep_settings(self) -> None:
        try:
            self.stuck_policy = StuckPolicy(self.stuck_policy)
        except ValueError:
            choices = ", ".join(StuckPolicy)
            raise DefinitionError(
                self.name, None, f"stuck_policy is one of {choices}, not {self.stuck_policy!r}"
            ) from None
        if self.stuck_grace < timedelta(0):
            raise DefinitionError(self.name, None, "stuck_grace cannot be negative")
        if self.default_expected_duration is not None and self.default_expected_duration <= (
            timedelta(0)
        ):
            raise DefinitionError(self.name, None, "default_expected_duration must be positive")
        if self.dead_letter_retry is not None and (problem := self.dead_letter_retry.problem()):
            raise DefinitionError(self.name, None, f"dead_letter_retry: {problem}")

    def stuck_after(self, index: int) -> timedelta:
        """No progress for this long at step ``index`` means the instance is stuck.

        The step's expected duration (else the saga's default, else the step's
        timeout) plus the saga's grace.
        """
        step = self._steps[index]
        expected = step.expected_duration or self.default_expected_duration or step.timeout
        return expected + self.stuck_grace

    @property
    def steps(self) -> tuple[StepDef, ...]:
        return tuple(self._steps)

    @property
    def pivot_index(self) -> int | None:
        return next((i for i, s in enumerate(self._steps) if s.kind is StepKind.PIVOT), None)

    def step_named(self, name: str) -> StepDef:
        for step in self._steps:
            if step.name == name:
                return step
        raise DefinitionError(self.name, name, "no such step")

    @overload
    def step(self, fn: Action, /) -> StepHandle: ...

    @overload
    def step(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        timeout: timedelta | None = None,
        retry: Retry | None = None,
        compensation_retry: Retry | None = None,
        pivot: bool = False,
        kind: StepKind | None = None,
        transactional: bool = False,
        expected_duration: timedelta | None = None,
    ) -> Callable[[Action], StepHandle]: ...

    def step(
        self,
        fn: Action | None = None,
        /,
        *,
        name: str | None = None,
        timeout: timedelta | None = None,
        retry: Retry | None = None,
        compensation_retry: Retry | None = None,
        pivot: bool = False,
        kind: StepKind | None = None,
        transactional: bool = False,
        expected_duration: timedelta | None = None,
    ) -> StepHandle | Callable[[Action], StepHandle]:
        """Decorator that adds ``fn`` as the next step (``@saga.step`` or
        ``@saga.step(timeout=...)``); see :meth:`add_step`. Returns the step's handle,
        whose ``.compensate`` decorator adds its undo."""

        def register(action: Action) -> StepHandle:
            step_kind = StepKind.PIVOT if pivot else kind
            return self.add_step(
                name or action.__name__,
                action,
                timeout=timeout,
                retry=retry,
                compensation_retry=compensation_retry,
                kind=step_kind,
                transactional=transactional,
                expected_duration=expected_duration,
            )

        return register(fn) if fn is not None else register

    def add_step(
        self,
        name: str,
        action: Action,
        compensation: Compensation | None = None,
        *,
        timeout: timedelta | None = None,
        retry: Retry | None = None,
        compensation_retry: Retry | None = None,
        kind: StepKind | None = None,
        transactional: bool = False,
        expected_duration: timedelta | None = None,
        remote: Remote | None = None,
        signal: str | None = None,
    ) -> StepHandle:
        """Append a step. Its kind defaults to compensatable before the pivot, retriable after.

        ``remote`` and ``signal`` are set by :meth:`remote_step` and
        :meth:`wait_for`, which are the way to add those steps.
        """
        after_pivot = self.pivot_index is not None
        step = StepDef(
            name=name,
            action=action,
            compensation=compensation,
            kind=kind or (StepKind.RETRIABLE if after_pivot else StepKind.COMPENSATABLE),
            timeout=timeout if timeout is not None else self.default_timeout,
            retry=retry or self.default_retry,
            compensation_retry=compensation_retry or self.default_compensation_retry,
            transactional=transactional,
            expected_duration=expected_duration,
            explicit_kind=kind is not None,
            remote=remote,
            signal=signal,
        )
        self._check_step(step, after_pivot)
        if problem := self._external_problem(step):
            raise DefinitionError(self.name, step.name, problem)
        self._steps.append(step)
        return StepHandle(self, name)

    def remote_step(
        self,
        name: str,
        command: str,
        *,
        compensation: str | None = None,
        timeout: timedelta | None = None,
        retry: Retry | None = None,
        compensation_retry: Retry | None = None,
        pivot: bool = False,
        kind: StepKind | None = None,
        expected_duration: timedelta | None = None,
    ) -> StepHandle:
        """Append a step that a participant service runs: ``command`` such as ``"hotel.reserve"``.

        The worker sends the command on the service's stream once the attempt's
        start is stored, and records the participant's reply; no worker thread
        waits meanwhile. ``compensation`` names the command that undoes it.
        The step's timeout is the deadline for the reply.
        """
        return self.add_step(
            name,
            _runs_remotely,
            _runs_remotely if compensation is not None else None,
            timeout=timeout,
            retry=retry,
            compensation_retry=compensation_retry,
            kind=StepKind.PIVOT if pivot else kind,
            expected_duration=expected_duration,
            remote=Remote(command, compensation),
        )

    def wait_for(
        self,
        event: str,
        *,
        name: str | None = None,
        timeout: timedelta | None = None,
        retry: Retry | None = None,
        expected_duration: timedelta | None = None,
    ) -> StepHandle:
        """Append a step that waits for the external event ``event`` (a signal), up to ``timeout``.

        :meth:`SagaEngine.signal` (or ``saga signal ID EVENT``) delivers it; the
        step's output is the signal's data. When the deadline passes first the
        step times out and its retry policy applies, which by default allows
        no second wait (``NO_RETRY``): the saga compensates, or, past the
        pivot, is dead-lettered. The step is named after the event unless
        ``name`` is given. With ``expected_duration`` shorter than ``timeout``, a
        wait that lasts longer is flagged stuck (plus the saga's grace) while it
        may still take its signal: someone should look.
        """
        return self.add_step(
            name or event,
            _runs_remotely,
            timeout=timeout,
            retry=retry or NO_RETRY,
            signal=event,
            expected_duration=expected_duration,
        )

    def set_compensation(self, step_name: str, fn: Compensation) -> None:
        index = next((i for i, s in enumerate(self._steps) if s.name == step_name), None)
        if index is None:
            raise DefinitionError(self.name, step_name, "no such step to compensate")
        step = self._steps[index]
        if step.external:
            raise DefinitionError(
                self.name, step_name, "a remote or waiting step is undone by a command"
            )
        if not callable(fn):
            raise DefinitionError(self.name, step_name, "the compensation is not callable")
        if step.kind is not StepKind.COMPENSATABLE:
            raise DefinitionError(
                self.name, step_name, f"a {step.kind} step cannot have a compensation"
            )
        self._steps[index] = replace(step, compensation=fn)

    def validate(self) -> Saga:
        """Checks that need the whole saga; returns it so calls can chain."""
        if not self._steps:
            raise DefinitionError(self.name, None, "a saga needs at least one step")
        for step in self._steps:
            if step.explicit_kind and step.kind is StepKind.COMPENSATABLE and not step.compensation:
                raise DefinitionError(
                    self.name, step.name, "declared compensatable but has no compensation"
                )
        return self

    def _check_step(self, step: StepDef, after_pivot: bool) -> None:
        def fail(problem: str) -> DefinitionError:
            return DefinitionError(self.name, step.name, problem)

        if not isinstance(step.name, str) or not _NAME.match(step.name):
            raise fail("a step name is letters, digits, '_', '.', '-' (max 100)")
        if any(s.name == step.name for s in self._steps):
            raise fail("duplicate step name")
        if not callable(step.action):
            raise fail("the action is not callable")
        if step.compensation is not None and not callable(step.compensation):
            raise fail("the compensation is not callable")
        if step.timeout <= timedelta(0):
            raise fail(f"timeout must be positive, got {step.timeout}")
        if step.expected_duration is not None and step.expected_duration <= timedelta(0):
            raise fail(f"expected_duration must be positive, got {step.expected_duration}")
        for label, policy in (
            ("retry", step.retry),
            ("compensation_retry", step.compensation_retry),
        ):
            if problem := policy.problem():
                raise fail(f"{label}: {problem}")
        if after_pivot and step.kind is StepKind.PIVOT:
            raise fail("a saga has at most one pivot step")
        if after_pivot and step.kind is StepKind.COMPENSATABLE:
            raise fail("a compensatable step cannot follow the pivot")
        if not after_pivot and step.kind is StepKind.RETRIABLE:
            raise fail("a retriable step must follow a pivot step")
        if step.kind is not StepKind.COMPENSATABLE and step.compensation is not None:
            raise fail(f"a {step.kind} step cannot have a compensation")

    def _external_problem(self, step: StepDef) -> str | None:
        if step.remote is not None and step.signal is not None:
            return "a step is either remote or waits for a signal, not both"
        if step.external and step.transactional:
            return "a remote or waiting step cannot be transactional"
        commands = [step.remote.action, step.remote.compensation] if step.remote else []
        for command in filter(None, commands):
            if not COMMAND_NAME.match(command):
                return f"command {command!r}: use 'service.name' of letters, digits, '_', '-', '.'"
        if step.signal is not None:
            if not _NAME.match(step.signal):
                return "an event name is letters, digits, '_', '.', '-' (max 100)"
            if any(s.signal == step.signal for s in self._steps):
                return f"another step already waits for event {step.signal!r}"
        return None


def _runs_remotely(ctx: StepContext, *output: Any) -> Any:
    # Stands in for the function of a remote or waiting step: the executor
    # sends a command or waits for a signal instead of calling it.
    raise NonRetryableError(
        f"step {ctx.step!r} runs in a participant or waits for a signal; "
        "it cannot be called in-process"
    )
