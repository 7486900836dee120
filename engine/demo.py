"""The demo behind ``saga demo`` (and the README's first command).

It runs everything in one process on whatever store is configured (SQLite
in the working directory when nothing is): migrates the store, registers the
example sagas, runs a worker and the sweeper, and starts sagas continuously
with a mix of outcomes (most succeed, some retry first, some compensate, a
few are dead-lettered, and a few get stuck: an expense whose manager never
answers, a step far slower than it is expected to be, a courier service that
hangs before it replies), printing counts by
state every few seconds. The demo plays the manager who approves the other
expenses, a few seconds after each starts.

It is built from parts so that more can run beside it: :func:`prepare`
builds the engine, :func:`run_demo` drives it until ``stop`` is set. A
caller that also serves something (the console) starts it between the two,
on the same engine, and sets ``stop`` on shutdown.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import count
from threading import Event
from typing import Any

from engine.errors import InvalidTransition, SagaNotFound
from engine.examples.expense_approval import APPROVAL
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
    #: For an expense: the demo approves it this many seconds after it starts (None: never).
    approve_after: float | None = None


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
    Scenario("approve_expense", "approved by the manager: completes", {}, 8, approve_after=3.0),
    Scenario("approve_expense", "the manager never answers: stuck, waits for you", {}, 1),
    Scenario(
        "approve_expense",
        "holding the funds takes 20s: stuck, then goes on",
        {"fail": {"ledger": "slow:20"}},
        1,
        approve_after=25.0,
    ),
    Scenario("ship_parcel", "courier answers: completes", {}, 8),
    Scenario(
        "ship_parcel",
        "courier hangs for 60s: stuck, then goes on",
        {"fail": {"courier": "slow:60"}},
        1,
    ),
)

#: The demo's sagas: shipped in the engine's own namespace, so the demo runs wherever
#: the engine is installed, not only from a checkout.
EXAMPLE_MODULES = (
    "engine.examples.travel_booking",
    "engine.examples.order_fulfillment",
    "engine.examples.expense_approval",
    # A remote step: its courier service runs in this process, on Redis when configured.
    "engine.examples.parcel_delivery",
)
#: The demo's stuck sweep looks this often (seconds), so a stuck saga shows up soon.
STUCK_SWEEP_SECONDS = 5.0


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
    settings = replace(
        settings, sweep_stuck_seconds=min(settings.sweep_stuck_seconds, STUCK_SWEEP_SECONDS)
    )
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
    manager = Manager(engine)
    began = time.monotonic()
    next_report = began + options.report_every
    for number in count(1):
        if stop.wait(1.0 / options.rate):
            return
        now = time.monotonic()
        if options.duration is not None and now - began >= options.duration:
            return
        manager.approve_due(now)
        start_one(engine, rng, number, stats, manager)
        if now >= next_report:
            out(progress_line(engine, stats, f"{now - began:5.0f}s"))
            next_report = now + options.report_every


def start_one(
    engine: SagaEngine,
    rng: random.Random,
    number: int,
    stats: DemoStats,
    manager: Manager | None = None,
) -> str:
    """Start one saga of a scenario drawn from the mix; returns its id."""
    scenario = rng.choices(SCENARIOS, weights=[s.weight for s in SCENARIOS])[0]
    key, payload = _payload(scenario, number)
    started = engine.start(scenario.saga, payload, business_key=key)
    stats.started += 1
    stats.by_scenario[scenario.label] = stats.by_scenario.get(scenario.label, 0) + 1
    if manager is not None and scenario.approve_after is not None:
        manager.approve_later(started.id, scenario.approve_after)
    return started.id


class Manager:
    """The demo's manager: approves the expenses it is told to, each when its time comes."""

    def __init__(self, engine: SagaEngine) -> None:
        self.engine = engine
        self._due: list[tuple[float, str]] = []  # a heap of (when, saga id)

    def approve_later(self, saga_id: str, seconds: float) -> None:
        heapq.heappush(self._due, (time.monotonic() + seconds, saga_id))

    def approve_due(self, now: float) -> int:
        """Send every approval that is due; returns how many the sagas took."""
        sent = 0
        while self._due and self._due[0][0] <= now:
            _, saga_id = heapq.heappop(self._due)
            try:
                self.engine.signal(saga_id, APPROVAL, {"approved_by": "demo-manager"})
            except (InvalidTransition, SagaNotFound):
                continue  # an operator got there first (compensated, cancelled...): fine
            sent += 1
        return sent


def _payload(scenario: Scenario, number: int) -> tuple[str, dict[str, Any]]:
    stamp = f"{int(time.time()) % 100000:05d}-{number}"
    if scenario.saga == "ship_parcel":
        key = f"PARCEL-{stamp}"
        return key, {"parcel": key, **scenario.faults}
    if scenario.saga == "approve_expense":
        key = f"EXP-{stamp}"
        return key, {"employee": "Grace Hopper", "amount_cents": 12000, **scenario.faults}
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
            "starting book_trip, fulfil_order, approve_expense and ship_parcel, about "
            f"{options.rate:g} a second, {until}:",
            "most complete, some retry first, some compensate, a few are dead-lettered,",
            "and a few get stuck (the console's Stuck tab; send the approval, or compensate).",
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
