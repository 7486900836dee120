"""Engines, workers and participant runtimes on one store (and maybe one Redis prefix).

Everything built is stopped and closed, in the right order, when the test ends.
"""

from __future__ import annotations

from typing import Any

from engine import Saga, SagaEngine, Settings
from engine.remote.participant import ParticipantRuntime, ParticipantService
from engine.transport.commands import CommandBus, InProcessBus
from engine.worker import Worker


class Deployment:
    """Builds engines with test-friendly settings; ``redis`` options put them on Redis."""

    def __init__(self, url: str, redis_url: str | None = None, prefix: str = "saga") -> None:
        self.url = url
        self.redis_url = redis_url
        self.prefix = prefix
        self.engines: list[SagaEngine] = []
        self.workers: list[Worker] = []
        self.runtimes: list[ParticipantRuntime] = []
        #: Shared by every engine built without Redis, as threads of one process share it.
        self.bus: CommandBus = InProcessBus()

    def engine(self, *sagas: Saga, worker_id: str = "w1", **settings: Any) -> SagaEngine:
        settings.setdefault("poll_seconds", 0.05)
        settings.setdefault("concurrency", 4)
        if self.redis_url is not None:
            settings.setdefault("redis_url", self.redis_url)
            settings.setdefault("redis_prefix", self.prefix)
        built = SagaEngine(
            sagas,
            settings=Settings(database_url=self.url, worker_id=worker_id, **settings),
            bus=None if self.redis_url is not None else self.bus,
        )
        self.engines.append(built)
        return built

    def worker(self, engine: SagaEngine) -> Worker:
        running: Worker = engine.worker()
        self.workers.append(running.start())
        return running

    def participant(
        self, engine: SagaEngine, *services: ParticipantService, **options: Any
    ) -> ParticipantRuntime:
        runtime = engine.participant(*services, **options).start()
        self.runtimes.append(runtime)
        return runtime

    def close(self) -> None:
        for running in self.workers:
            running.stop(timeout=30)
        for runtime in self.runtimes:
            runtime.stop(timeout=30)
        for built in self.engines:
            built.close()
