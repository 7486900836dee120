"""Helpers for the sweep, sweeper-lock and metrics tests: a clock the test moves, a
transport that records doorbells and delivers none, sagas steered by their payload,
and an attempt left behind by a worker that died."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from engine import NonRetryableError, Retry, Saga, SagaEngine, Settings, StepContext
from engine.decide import Run, begin_attempt
from engine.model import Instance
from engine.transport.doorbells import Delivery

T0 = 1_800_000_000_000
#: A failed attempt waits an hour: nothing moves by itself while a test looks.
SLOW = Retry(max_attempts=3, initial_delay=timedelta(hours=1), jitter=0.0)
#: A payload that dead-letters :func:`saga`'s sagas: b gives up, then a's undo fails.
REFUND_FAILS = {"fatal": ["b"], "fail_undo": ["a"]}


class Clock:
    """Epoch milliseconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def advance(self, **span: float) -> int:
        self.now += int(timedelta(**span).total_seconds() * 1000)
        return self.now


class Bells:
    """A transport that records doorbells and delivers nothing: no worker is listening."""

    def __init__(self) -> None:
        self.rung: list[str] = []

    def publish(self, saga_id: str) -> None:
        self.rung.append(saga_id)

    def receive(self, max_count: int, timeout: float) -> list[Delivery]:
        return []

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        return None

    def close(self) -> None:
        return None

    def take(self) -> list[str]:
        rung, self.rung = self.rung, []
        return sorted(rung)


def step(name: str) -> Callable[[StepContext], Any]:
    """An action steered by the payload: ``fail`` retries, ``fatal`` gives up at once."""

    def action(ctx: StepContext) -> Any:
        if name in ctx.payload.get("fail", ()):
            raise RuntimeError(f"{name} is down")
        if name in ctx.payload.get("fatal", ()):
            raise NonRetryableError(f"{name} said no")
        return {"done": name}

    return action


def undo(name: str) -> Callable[[StepContext, Any], Any]:
    def compensation(ctx: StepContext, output: Any) -> None:
        if name in ctx.payload.get("fail_undo", ()):
            raise RuntimeError(f"cannot undo {name}")

    return compensation


def saga(name: str, steps: Sequence[str] = ("a", "b"), **options: Any) -> Saga:
    """Compensatable steps with a ten-minute timeout, failures retried an hour later."""
    options.setdefault("default_timeout", timedelta(minutes=10))
    options.setdefault("default_retry", SLOW)
    options.setdefault("default_compensation_retry", Retry(max_attempts=1))
    built = Saga(name, **options)
    for s in steps:
        built.add_step(s, step(s), undo(s))
    return built.validate()


class World:
    """Engines on one store, sharing a clock and a silent transport."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.clock = Clock()
        self.bells = Bells()
        self._engines: list[SagaEngine] = []

    def engine(self, *sagas: Saga, **settings: Any) -> SagaEngine:
        settings.setdefault("worker_id", "test-host")
        made = SagaEngine(
            sagas,
            settings=Settings(database_url=self.url, **settings),
            transport=self.bells,
            clock=self.clock,
        )
        self._engines.append(made)
        return made

    def close(self) -> None:
        for made in self._engines:
            made.close()


def begun_by_a_dead_worker(engine: SagaEngine, saga_id: str, lease: timedelta) -> Instance:
    """Claim the instance and store the start of its next attempt, as a worker that then
    died would have: the attempt stays marked running, and the lease runs out."""
    now = engine.clock()
    held = engine.store.claim(saga_id, "dead-worker", int(lease.total_seconds() * 1000), now)
    assert held is not None
    defn = engine.registry.get(held.saga_name, held.saga_version)
    run = Run(held.cursor, held.phase, held.current.attempts_of(held.phase) + 1)
    return engine.store.save(
        held, begin_attempt(held, defn, run, now), "dead-worker", owner="dead-worker"
    )


def wait_for_line(process: subprocess.Popen[str], text: str, timeout: float = 30.0) -> str:
    """The first line of the process's stderr that contains ``text`` (it keeps being read)."""
    found = threading.Event()
    lines: list[str] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if text in line and not found.is_set():
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        raise AssertionError(f"no {text!r} from the process; it said: {''.join(lines)}")
    return next(line for line in lines if text in line)
