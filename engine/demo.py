"""The demo behind ``saga demo`` (and the README's first command).

It runs everything in one process on whatever store is configured (SQLite
in the working directory when nothing is): migrates the store, registers the
two example sagas, runs a worker, and starts sagas continuously with a mix
of outcomes (most succeed, some retry first, some compensate, a few are
dead-lettered), printing counts by state every few seconds.

It is built from parts so that more can run beside it: :func:`prepare`
builds the engine, :func:`run_demo` drives it until ``stop`` is set. A
caller that also serves something (the console) starts it between the two,
on the same engine, and sets ``stop`` on shutdown.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import count
from threading import Event
from typing import Any

from engine.loader import load_app
from engine.queries import Queries
from engine.runtime import SagaEngine
from engine.settings import Settings
from engine.store import migrate


@dataclass(frozen=True)
class Scenario:
    """One kind of demo traffic: a saga, a payload with its faults, and how often."""

    saga: str
    label: str
    faults: dict[str, Any]
    weight: int


#: The outcome mix. Faults are explained in engine/examples/participants.py.
SCENARIOS = (
    Scenario("book_trip", "completes", {}, 30),
    Scenario("book_trip", "retried, then completes", {"fail": {"flight": "flaky:2"}}, 6),
    Scenario(
        "book_trip",
        "times out once; the guard absorbs the repeat",
        {"fail": {"hotel": "timeout:1"}},
        2,
    ),
    Scenario("book_trip", "no car: compensated", {"fail": {"car": "permanent"}}, 6),
    Scenario("book_trip", "car desk hangs: compensated", {"fail": {"car": "timeout"}}, 1),
    Scenario(
        "book_trip",
        "flight cannot be cancelled: dead-lettered",
        {"fail": {"car": "permanent"}, "fail_compensation": {"flight": "flaky:4"}},
        2,
    ),
    Scenario("fulfil_order", "completes", {}, 30),
    Scenario("fulfil_order", "retried, then completes", {"fail": {"shipping": "flaky:2"}}, 6),
    Scenario(
        "fulfil_order", "payment declined: compensated", {"fail": {"payment": "permanent"}}, 6
    ),
    Scenario(
        "fulfil_order",
        "carrier down after payment: dead-lettered",
        {"fail": {"shipping": "flaky:3"}},
        3,
    ),
)

#: The demo's sagas: shipped in the engine's own namespace, so the demo runs wherever
#: the engine is installed, not only from a checkout.
EXAMPLE_MODULES = ("engine.examples.travel_booking", "engine.examples.order_fulfillment")


@dataclass(frozen=True)
class DemoOptions:
    """How fast and how long the demo runs."""

    rate: float = 3.0  # sagas started per second
    duration: float | None = None  # seconds; None runs until stopped
    concurrency: int | None = None  # worker concurrency; None uses the settings
    report_every: float = 5.0  # seconds between progress lines
    seed: int | None = None


@dataclass
class DemoStats:
    """What this run started, by scenario label."""

    started: int = 0
    by_scenario: dict[str, int] = field(default_factory=dict)


def prepare(settings: Settings | None = None) -> SagaEngine:
    """Migrate the store and build an engine with the example sagas registered and bound."""
    settings = settings or Settings.from_env()
    migrate.upgrade(settings.database_url)
    app = load_app(EXAMPLE_MODULES)
    engine = SagaEngine(app.sagas, settings=settings)
    app.init(engine)
    return engine


def run_demo(
    engine: SagaEngine,
    stop: Event,
    options: DemoOptions = DemoOptions(),
    out: Callable[[str], None] = print,
) -> DemoStats:
    """Run a worker and start sagas until ``stop`` is set or the duration passes."""
    settings = engine.settings
    if options.concurrency:
        settings = replace(settings, concurrency=options.concurrency)
    worker = engine.worker(settings.concurrency).start()
    # The sweeps too (stuck detection, overdue deadlines, lost doorbells), as in production.
    sweeper = engine.sweeper().start()
    out(_intro(engine, options, worker.concurrency))
    stats = DemoStats()
    try:
        _drive(engine, stop, options, stats, out)
    finally:
        out("stopping: letting the worker finish the steps in hand...")
        sweeper.stop()
        worker.stop()
    out(progress_line(engine, stats, "done"))
    out(_outro())
    return stats


def _drive(
    engine: SagaEngine,
    stop: Event,
    options: DemoOptions,
    stats: DemoStats,
    out: Callable[[str], None],
) -> None:
    rng = random.Random(options.seed)
    began = time.monotonic()
    next_report = began + options.report_every
    for number in count(1):
        if stop.wait(1.0 / options.rate):
            return
        now = time.monotonic()
        if options.duration is not None and now - began >= options.duration:
            return
        start_one(engine, rng, number, stats)
        if now >= next_report:
            out(progress_line(engine, stats, f"{now - began:5.0f}s"))
            next_report = now + options.report_every


def start_one(engine: SagaEngine, rng: random.Random, number: int, stats: DemoStats) -> str:
    """Start one saga of a scenario drawn from the mix; returns its id."""
    scenario = rng.choices(SCENARIOS, weights=[s.weight for s in SCENARIOS])[0]
    key, payload = _payload(scenario, number)
    started = engine.start(scenario.saga, payload, business_key=key)
    stats.started += 1
    stats.by_scenario[scenario.label] = stats.by_scenario.get(scenario.label, 0) + 1
    return started.id


def _payload(scenario: Scenario, number: int) -> tuple[str, dict[str, Any]]:
    stamp = f"{int(time.time()) % 100000:05d}-{number}"
    if scenario.saga == "book_trip":
        key = f"TRIP-{stamp}"
        base: dict[str, Any] = {
            "trip": key,
            "traveller": "Ada Lovelace",
            "hotel": "Hotel Adlon",
            "nights": 3,
            "flight": "LH 1234",
            "car": "compact",
        }
    else:
        key = f"ORDER-{stamp}"
        base = {
            "order": key,
            "sku": "BOOK-42",
            "quantity": 2,
            "amount_cents": 4999,
            "address": "1 Main St, Springfield",
        }
    return key, {**base, **scenario.faults}


def progress_line(engine: SagaEngine, stats: DemoStats, label: str) -> str:
    """``[  10s] started 30 | running 2  compensating 0  completed 24 ...``."""
    counts = Queries(engine.store).counts_by_state()
    states = "  ".join(f"{state} {n}" for state, n in counts.items())
    return f"[{label}] started {stats.started} this run | in the store: {states}"


def _intro(engine: SagaEngine, options: DemoOptions, concurrency: int) -> str:
    url = engine.settings.database_url
    queue = "Redis" if engine.settings.redis_url else "the in-process queue"
    until = f"for {options.duration:g}s" if options.duration else "until Ctrl-C"
    return "\n".join(
        [
            f"saga demo: store {url}, {queue}, one worker (concurrency {concurrency}) "
            "and the sweeper",
            f"starting book_trip and fulfil_order, about {options.rate:g} a second, {until}:",
            "most complete, some retry first, some compensate, a few are dead-lettered.",
            f"progress every {options.report_every:g}s; inspect from another terminal:",
            *_commands(),
        ]
    )


def _outro() -> str:
    return "\n".join(["inspect what ran:", *_commands()])


def _commands() -> list[str]:
    app = "-A " + ",".join(EXAMPLE_MODULES)
    return [
        "  saga list --state failed                  dead-lettered instances",
        "  saga show ID                              steps, timeline, dead letters",
        f'  saga {app} retry ID --reason "..."',
    ]
