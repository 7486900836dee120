"""Engines and workers for tests, closed in the right order when the test ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from engine import Saga, SagaEngine, SagaState, Settings
from engine.model import Instance
from engine.queries import EventRecord, Queries
from engine.transport.doorbells import Transport
from engine.worker import Worker


class Engines:
    """Builds engines on one store URL with settings fit for tests (fast polling)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engines: list[SagaEngine] = []
        self._workers: list[Worker] = []

    def __call__(
        self,
        *sagas: Saga,
        worker_id: str = "test-worker",
        lease_seconds: float = 30.0,
        poll_seconds: float = 0.05,
        concurrency: int = 4,
        transport: Transport | None = None,
    ) -> SagaEngine:
        settings = Settings(
            database_url=self.url,
            lease_seconds=lease_seconds,
            poll_seconds=poll_seconds,
            concurrency=concurrency,
            worker_id=worker_id,
        )
        engine = SagaEngine(sagas, settings=settings, transport=transport)
        self._engines.append(engine)
        return engine

    def worker(self, engine: SagaEngine, concurrency: int | None = None) -> Worker:
        """A started worker thread, stopped when the test ends."""
        worker: Worker = engine.worker(concurrency)
        self._workers.append(worker)
        return worker.start()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop(timeout=30)
        for engine in self._engines:
            engine.close()


def wait_for(what: Callable[[], Any], timeout: float = 20.0, every: float = 0.02) -> Any:
    """Poll ``what`` until it returns something truthy; fail after ``timeout`` seconds."""
    give_up = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"still waiting after {timeout}s for {what}")
        time.sleep(every)


def wait_state(
    engine: SagaEngine, saga_id: str, *states: SagaState, timeout: float = 20.0
) -> Instance:
    """The instance once it reaches one of ``states``."""

    def reached() -> Instance | None:
        inst = engine.get(saga_id)
        return inst if inst.state in states and inst.lease_owner is None else None

    try:
        found: Instance = wait_for(reached, timeout)
    except AssertionError:
        inst = engine.get(saga_id)
        raise AssertionError(
            f"saga {saga_id} is {inst.state} at step {inst.cursor}, "
            f"wanted {[str(s) for s in states]}"
        ) from None
    return found


def timeline(engine: SagaEngine, saga_id: str) -> list[EventRecord]:
    return Queries(engine.store).timeline(saga_id)


def kinds(events: list[EventRecord]) -> list[tuple[str, str | None, str | None]]:
    """(kind, step, phase) of each event, for readable assertions."""
    return [(e.kind, e.step_name, e.phase) for e in events]
