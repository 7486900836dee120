"""Prometheus metrics: what sagas do, counted where it happens, and gauges read from the store.

Counters and histograms live in this process. What each stored transition
did is counted from its events (sagas started, completed, compensated,
dead-lettered; attempts and their durations; failed compensations) by
:func:`transition_saved`, which the store calls once the transaction that
stored the transition committed (the hook :func:`engine.store.open_store`
gives every store it opens). So every path (workers, inline runs, operators,
the sweeper) is counted once, and only what was committed; the idempotency
guard counts the duplicates it absorbs, also after their commit; the sweeps
time themselves. None of this costs a query: a loop over the transition's few
events. This module knows nothing of the store: it is told.

The gauges (instances by state, stuck instances, dead-letter depth and age)
are read from the store when Prometheus scrapes, by :class:`StoreCollector`,
through partial indexes that hold only active, failed or flagged rows: a
scrape never scans finished instances. Labels are saga type, step, phase,
outcome and sweep names, never a saga id.

:func:`exposition` renders a scrape (the console's ``/metrics``);
:func:`serve` answers scrapes on a port (``--metrics-port`` of ``saga
worker`` and ``saga sweeper``). With ``PROMETHEUS_MULTIPROC_DIR`` set (the
console under gunicorn with several workers), the counters of every process
are read from that directory, and the store gauges are computed once, by
the process answering the scrape.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from engine.model import Event, EventKind, Instance, now_ms
from engine.states import Phase, SagaState

log = logging.getLogger(__name__)

#: Step attempts run from milliseconds (a transactional step) to minutes (a slow service).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SWEEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

STARTED = Counter("saga_started", "Saga instances started.", ["saga"])
COMPLETED = Counter("saga_completed", "Saga instances that completed every step.", ["saga"])
COMPENSATED = Counter("saga_compensated", "Saga instances that undid every started step.", ["saga"])
DEAD_LETTERED = Counter(
    "saga_dead_lettered", "Times a saga instance was dead-lettered (waits for a person).", ["saga"]
)
COMPENSATION_FAILURES = Counter(
    "saga_compensation_failures",
    "Compensation attempts that failed, timed out or were abandoned.",
    ["saga", "step"],
)
STEP_ATTEMPTS = Counter(
    "saga_step_attempts",
    "Step attempts by how they ended (succeeded, failed, timed_out, abandoned).",
    ["saga", "step", "phase", "outcome"],
)
STEP_DURATION = Histogram(
    "saga_step_duration_seconds",
    "How long step attempts took, by how they ended.",
    ["saga", "step", "phase", "outcome"],
    buckets=STEP_BUCKETS,
)
ACTIONS_FENCED = Counter(
    "saga_actions_fenced",
    "Late actions the idempotency guard refused: their step's compensation had run first.",
    ["scope"],
)
DUPLICATES_ABSORBED = Counter(
    "saga_duplicates_absorbed",
    "Repeated deliveries the idempotency guard answered without running the effect again.",
    ["scope"],
)
SWEEP_DURATION = Histogram(
    "saga_sweep_duration_seconds",
    "How long each sweep pass took (only the leading sweeper sweeps).",
    ["sweep"],
    buckets=SWEEP_BUCKETS,
)
SWEEP_ACTIONS = Counter(
    "saga_sweep_actions", "What the sweeps did, by sweep and action.", ["sweep", "action"]
)
SWEEP_ERRORS = Counter("saga_sweep_errors", "Sweep passes that failed.", ["sweep"])
# "max": under multiprocess mode the console's processes report 0 and must not hide a 1.
SWEEPER_LEADER = Gauge(
    "saga_sweeper_leader",
    "1 while this process holds the sweeper lock and runs the sweeps.",
    multiprocess_mode="max",
)
WORKER_ERRORS = Counter(
    "saga_worker_advance_errors",
    "Instances a worker failed to advance for an unexpected reason (retried later).",
)

# -- participants (saga participant): what the services on the other end see ----------

PARTICIPANT_COMMANDS = Counter(
    "saga_participant_commands",
    "Commands a participant took, by how it answered: success, retry (a failure worth "
    "another attempt), fail (one no retry mends), or expired (arrived after its deadline, "
    "dropped unanswered).",
    ["command", "outcome"],
)
PARTICIPANT_HANDLER_DURATION = Histogram(
    "saga_participant_handler_duration_seconds",
    "How long participant handlers ran, by how they answered.",
    ["command", "outcome"],
    buckets=STEP_BUCKETS,
)
PARTICIPANT_COMMAND_WAIT = Histogram(
    "saga_participant_command_wait_seconds",
    "From the worker sending a command to its handler starting: the command queue's delay.",
    ["command"],
    buckets=STEP_BUCKETS,
)
PARTICIPANT_BUSY = Gauge(
    "saga_participant_busy",
    "Commands being handled now.",
    multiprocess_mode="livesum",
)
PARTICIPANT_REPLIES_UNSENT = Counter(
    "saga_participant_replies_unsent",
    "Replies that could not be sent (Redis unreachable); their commands are delivered again.",
    ["command"],
)
EVENT_HANDLER_RUNS = Counter(
    "saga_event_handler_runs",
    "Runs of domain-event handlers (choreography), by handler and how they ended: succeeded, "
    "failed (tried again), dead_lettered (failed its last attempt).",
    ["handler", "outcome"],
)
EVENT_HANDLER_DURATION = Histogram(
    "saga_event_handler_duration_seconds",
    "How long domain-event handler runs took, by handler.",
    ["handler"],
    buckets=STEP_BUCKETS,
)
POISON_RECORDS = Counter(
    "saga_poison_records",
    "Entries set aside on the poison stream, by the stream they came from and why: "
    "malformed, redelivered (taken over too often, never acknowledged), refused (by the store).",
    ["stream", "why"],
)

_SAGA_COUNTERS = {
    EventKind.SAGA_STARTED: STARTED,
    EventKind.SAGA_COMPLETED: COMPLETED,
    EventKind.SAGA_COMPENSATED: COMPENSATED,
    EventKind.DEAD_LETTERED: DEAD_LETTERED,
}
#: Events that end an attempt, and the ``outcome`` label each gives it.
_OUTCOMES = {
    EventKind.ATTEMPT_SUCCEEDED: "succeeded",
    EventKind.ATTEMPT_FAILED: "failed",
    EventKind.ATTEMPT_TIMED_OUT: "timed_out",
    EventKind.ATTEMPT_ABANDONED: "abandoned",
}


# -- hooks on the paths that make changes ------------------------------------------


def transition_saved(old: Instance | None, new: Instance, events: Sequence[Event]) -> None:
    """Count what a stored transition did; the store calls this once its transaction
    committed (a :data:`engine.store.TransitionHook`).

    Counting what was committed (not what ran) keeps the metrics equal to the
    store: an attempt whose transaction rolled back and ran again (a
    transactional step) counts once, and a transition rolled back not at all.
    An attempt's duration runs from its start, found in the same transition or
    on ``old``, to its outcome.
    """
    begun: dict[tuple[int | None, Phase | None, int | None], int | None] = {}
    for ev in events:
        if ev.kind is EventKind.ATTEMPT_STARTED:
            begun[ev.step_index, ev.phase, ev.attempt] = ev.at
        elif ev.kind in _OUTCOMES:
            start = begun.get((ev.step_index, ev.phase, ev.attempt)) or _began(old, ev)
            _attempt_ended(new, ev, start)
        elif (counter := _SAGA_COUNTERS.get(ev.kind)) is not None:
            _child(counter, (new.saga_name,)).inc()


def _attempt_ended(inst: Instance, ev: Event, began: int | None) -> None:
    step = inst.steps[ev.step_index].name if ev.step_index is not None else ""
    labels = (inst.saga_name, step, str(ev.phase), _OUTCOMES[ev.kind])
    _child(STEP_ATTEMPTS, labels).inc()
    if ev.at is not None and began is not None:
        _child(STEP_DURATION, labels).observe(max(ev.at - began, 0) / 1000)
    if ev.phase is Phase.COMPENSATE and ev.kind is not EventKind.ATTEMPT_SUCCEEDED:
        _child(COMPENSATION_FAILURES, (inst.saga_name, step)).inc()


# The children of the hot path's metrics, by label values: ``labels()`` checks and
# converts its arguments and takes a lock on every call; a saga calls it a dozen times.
_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def _child(metric: Any, labels: tuple[str, ...]) -> Any:
    key = (id(metric), labels)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN.setdefault(key, metric.labels(*labels))
    return found


def _began(old: Instance | None, ev: Event) -> int | None:
    """When the attempt ``ev`` ends began, from the instance before the transition."""
    if old is None or ev.step_index is None:
        return None
    step = old.steps[ev.step_index]
    if ev.phase is Phase.COMPENSATE:
        return step.comp_started_at if step.comp_attempts == ev.attempt else None
    return step.started_at if step.attempts == ev.attempt else None


def duplicate_absorbed(scope: str) -> None:
    DUPLICATES_ABSORBED.labels(scope).inc()


def action_fenced(scope: str) -> None:
    ACTIONS_FENCED.labels(scope).inc()


def command_answered(command: str, outcome: str, started_ms: int, finished_ms: int) -> None:
    """A participant's handler answered ``command`` (``outcome``: success, retry, fail)."""
    PARTICIPANT_COMMANDS.labels(command, outcome).inc()
    seconds = max(0, finished_ms - started_ms) / 1000
    PARTICIPANT_HANDLER_DURATION.labels(command, outcome).observe(seconds)


def event_handled(handler: str, outcome: str, seconds: float) -> None:
    """A domain-event handler ran (``outcome``: succeeded, failed, dead_lettered)."""
    EVENT_HANDLER_RUNS.labels(handler, outcome).inc()
    EVENT_HANDLER_DURATION.labels(handler).observe(seconds)


def command_expired(command: str) -> None:
    PARTICIPANT_COMMANDS.labels(command, "expired").inc()


def command_waited(command: str, sent_ms: int, started_ms: int) -> None:
    # Clocks of two hosts: a negative wait is skew, not time travel.
    PARTICIPANT_COMMAND_WAIT.labels(command).observe(max(0, started_ms - sent_ms) / 1000)


def set_aside(stream: str, why: str) -> None:
    """An entry of ``stream`` went to the poison stream (``why``: malformed, redelivered,
    refused)."""
    POISON_RECORDS.labels(stream, why).inc()


# -- gauges read from the store at scrape time ----------------------------------------

#: The states the gauges count: the active ones and ``failed``, never the finished bulk.
GAUGE_STATES = (SagaState.RUNNING, SagaState.COMPENSATING, SagaState.FAILED)


class LiveCounts(Protocol):
    """What the store gauges show, read in one go (the store's ``LiveCounts``)."""

    #: (saga, state) -> instances, for running, compensating and failed.
    @property
    def instances(self) -> Mapping[tuple[str, str], int]: ...

    #: saga -> instances the stuck sweep flagged.
    @property
    def stuck(self) -> Mapping[str, int]: ...

    #: saga -> (open dead letters, creation time of the oldest, epoch ms).
    @property
    def dead_letters(self) -> Mapping[str, tuple[int, int]]: ...


class LiveCountSource(Protocol):
    """Where the gauges come from: the store (:meth:`engine.store.Store.live_counts`)."""

    def live_counts(self) -> LiveCounts: ...


class StoreCollector(Collector):
    """Gauges computed from the store when Prometheus scrapes.

    ``sagas`` names the saga types to report even at zero (so an alert on a
    missing series is not needed); others appear once they have rows.
    """

    def __init__(
        self,
        store: LiveCountSource,
        sagas: Callable[[], Iterable[str]] = tuple,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.sagas = sagas
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        try:
            counts = self.store.live_counts()
        except Exception as exc:
            # A scrape must answer, whatever failed reading the store (unreachable, a
            # schema behind its code...): report it down in saga_store_up, and here.
            log.warning("metrics: cannot read the store: %s: %s", type(exc).__name__, exc)
            yield _single("saga_store_up", "1 when the store answered this scrape.", 0)
            return
        yield _single("saga_store_up", "1 when the store answered this scrape.", 1)
        names = sorted(set(self.sagas()) | _names_in(counts))
        yield from self._families(counts, names)
        yield _single(
            "saga_store_scrape_duration_seconds",
            "How long reading the store gauges took.",
            time.perf_counter() - started,
        )

    def _families(self, counts: LiveCounts, names: list[str]) -> Iterator[Metric]:
        instances = GaugeMetricFamily(
            "saga_instances",
            "Instances running, compensating or failed (dead-lettered), by saga.",
            labels=["saga", "state"],
        )
        stuck = GaugeMetricFamily(
            "saga_stuck_instances",
            "Instances flagged stuck (no progress), by saga.",
            labels=["saga"],
        )
        depth = GaugeMetricFamily(
            "saga_dead_letter_depth",
            "Open dead letters (waiting for a person), by saga.",
            labels=["saga"],
        )
        age = GaugeMetricFamily(
            "saga_dead_letter_oldest_age_seconds",
            "Age of the oldest open dead letter, by saga (0 when there is none).",
            labels=["saga"],
        )
        now = self.clock()
        for name in names:
            for state in GAUGE_STATES:
                instances.add_metric([name, str(state)], counts.instances.get((name, state), 0))
            stuck.add_metric([name], counts.stuck.get(name, 0))
            open_count, oldest = counts.dead_letters.get(name, (0, now))
            depth.add_metric([name], open_count)
            age.add_metric([name], max(now - oldest, 0) / 1000 if open_count else 0.0)
        yield from (instances, stuck, depth, age)


def _names_in(counts: LiveCounts) -> set[str]:
    return {n for n, _ in counts.instances} | set(counts.stuck) | set(counts.dead_letters)


def _single(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


# -- exposition --------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode, when it is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _Forward(Collector):
    """Hands on another registry's metrics (the process's own, in single-process mode)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()


def registry_with(*collectors: Collector) -> CollectorRegistry:
    """A registry of this process's metrics (or every process's, in multiprocess mode)
    plus ``collectors``, built per use so nothing is registered twice."""
    registry = CollectorRegistry()
    if multiprocess_dir():
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Forward(REGISTRY))
    for collector in collectors:
        registry.register(collector)
    return registry


def exposition(*collectors: Collector) -> bytes:
    """One scrape, in the Prometheus text format."""
    return generate_latest(registry_with(*collectors))


def serve(port: int, *collectors: Collector, addr: str = "0.0.0.0") -> WSGIServer:
    """Answer scrapes on ``port`` from a daemon thread; ``shutdown()`` the result to stop."""
    server, _thread = start_http_server(port, addr, registry=registry_with(*collectors))
    log.info("metrics on http://%s:%d/metrics", addr, server.server_port)
    return server


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def values(text: str) -> Samples:
    """Parse a scrape into {(sample name, sorted labels): value}, for tests and checks."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def total(parsed: Samples, name: str, **labels: Any) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = {(k, str(v)) for k, v in labels.items()}
    return sum(v for (n, ls), v in parsed.items() if n == name and wanted <= set(ls))
