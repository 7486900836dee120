"""Stdlib-only load harness for saga benchmarks.

Every variant (floor, DBOS, our engine) supplies a callable ``one(i)`` that runs
one complete saga with a unique integer ``i`` and raises on failure.  The
harness times it sequentially and with C concurrent caller threads, always after
an untimed warm-up, and reports plain dicts so any variant script can dump them
as JSON.  It imports nothing outside the standard library, so it works from any
venv (the project venv, bench/.venv-dbos, ...).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SagaFn = Callable[[int], object]

# One counter per process: every call gets a distinct i across all phases, so
# idempotency keys built from i never collide between warm-up and measurement.
_next_index = itertools.count()
_index_lock = threading.Lock()


def next_index() -> int:
    """Return a process-wide unique saga index (thread-safe)."""
    with _index_lock:
        return next(_next_index)


@dataclass
class _Tally:
    """Latencies and failures gathered by one caller thread."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None


def _timed_call(one: SagaFn, tally: _Tally) -> None:
    """Run one saga, recording its latency or its failure into ``tally``."""
    i = next_index()
    start = time.perf_counter()
    try:
        one(i)
    except Exception as exc:  # a failing saga must not kill the caller thread
        tally.errors += 1
        if tally.first_error is None:
            tally.first_error = f"{type(exc).__name__}: {exc}"[:300]
        return
    tally.latencies_ms.append((time.perf_counter() - start) * 1000.0)


def percentiles(latencies_ms: list[float]) -> dict[str, float | None]:
    """Return p50/p95/p99 and mean (ms, 3 decimals); None when there is no data."""
    if not latencies_ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    if len(latencies_ms) == 1:
        only = round(latencies_ms[0], 3)
        return {"p50_ms": only, "p95_ms": only, "p99_ms": only, "mean_ms": only}
    # 'inclusive' interpolates between observed samples, like numpy's default.
    cuts = statistics.quantiles(latencies_ms, n=100, method="inclusive")
    return {
        "p50_ms": round(cuts[49], 3),
        "p95_ms": round(cuts[94], 3),
        "p99_ms": round(cuts[98], 3),
        "mean_ms": round(statistics.fmean(latencies_ms), 3),
    }


def _summary(
    mode: str, threads: int, tally: _Tally, elapsed_s: float, cpu_s: float
) -> dict[str, Any]:
    """Build the result dict shared by sequential and concurrent runs."""
    ok = len(tally.latencies_ms)
    # Client-process CPU per saga (all threads; excludes the PostgreSQL server):
    # shows how much of a variant's latency is its own Python work.
    cpu_ms_per_saga = round(cpu_s * 1000.0 / ok, 3) if ok else None
    return {
        "mode": mode,
        "threads": threads,
        "ok": ok,
        "errors": tally.errors,
        "first_error": tally.first_error,
        "elapsed_s": round(elapsed_s, 3),
        "throughput_per_s": round(ok / elapsed_s, 2) if elapsed_s > 0 else None,
        "client_cpu_ms_per_saga": cpu_ms_per_saga,
        **percentiles(tally.latencies_ms),
    }


def run_sequential(one: SagaFn, n: int, warmup: int = 20) -> dict[str, Any]:
    """Run ``one`` ``n`` times back to back on the calling thread.

    ``warmup`` calls run first and are not measured.  Returns a dict with
    ok/errors counts, elapsed_s, throughput_per_s and p50/p95/p99/mean in ms.
    """
    for _ in range(warmup):
        _timed_call(one, _Tally())
    tally = _Tally()
    cpu0, start = time.process_time(), time.perf_counter()
    for _ in range(n):
        _timed_call(one, tally)
    elapsed = time.perf_counter() - start
    return _summary("sequential", 1, tally, elapsed, time.process_time() - cpu0)


def _merge(tallies: list[_Tally]) -> _Tally:
    """Fold per-thread tallies into one."""
    merged = _Tally()
    for t in tallies:
        merged.latencies_ms.extend(t.latencies_ms)
        merged.errors += t.errors
        merged.first_error = merged.first_error or t.first_error
    return merged


class _Budget:
    """Shared stop condition: a call count, a deadline, or both (first one wins)."""

    def __init__(self, count: int | None, duration_s: float | None) -> None:
        self._left = count
        self._duration_s = duration_s
        self._deadline: float | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the clock; called once, after the warm-up barrier."""
        if self._duration_s is not None:
            self._deadline = time.perf_counter() + self._duration_s

    def take(self) -> bool:
        """Claim one more call; False once the count or the time is used up."""
        if self._deadline is not None and time.perf_counter() >= self._deadline:
            return False
        if self._left is None:
            return True
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            return True


def run_concurrent(
    one: SagaFn,
    threads: int,
    count: int | None = 2000,
    duration_s: float | None = 10.0,
    warmup_per_thread: int = 5,
) -> dict[str, Any]:
    """Run ``one`` from ``threads`` caller threads until ``count`` calls or ``duration_s`` pass.

    Each thread first makes ``warmup_per_thread`` unmeasured calls; all threads
    then meet at a barrier so the timed window starts with every caller warm.
    At least one of ``count`` / ``duration_s`` must be set.  Returns the same
    dict shape as :func:`run_sequential` with ``mode='concurrent'``.
    """
    if count is None and duration_s is None:
        raise ValueError("run_concurrent needs a count, a duration, or both")
    budget = _Budget(count, duration_s)
    tallies = [_Tally() for _ in range(threads)]
    # threads + 1 parties: the main thread starts the clock once all are warm.
    barrier = threading.Barrier(threads + 1)

    def caller(tally: _Tally) -> None:
        for _ in range(warmup_per_thread):
            _timed_call(one, _Tally())
        barrier.wait()
        barrier.wait()  # second rendezvous: budget clock is now running
        while budget.take():
            _timed_call(one, tally)

    workers = [threading.Thread(target=caller, args=(t,), daemon=True) for t in tallies]
    for w in workers:
        w.start()
    barrier.wait()
    budget.start()
    cpu0, start = time.process_time(), time.perf_counter()
    barrier.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    cpu_s = time.process_time() - cpu0
    return _summary("concurrent", threads, _merge(tallies), elapsed, cpu_s)


@dataclass(frozen=True)
class Plan:
    """How much load each phase gets; shared by all variants so runs compare."""

    seq_n: int = 300
    seq_warmup: int = 20
    threads: tuple[int, ...] = (8, 32)
    conc_count: int | None = 2000
    conc_duration_s: float | None = 10.0
    conc_warmup_per_thread: int = 5


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    """Add the standard --seq-n/--threads/--conc-count/... options to ``parser``."""
    d = Plan()
    parser.add_argument("--seq-n", type=int, default=d.seq_n)
    parser.add_argument("--seq-warmup", type=int, default=d.seq_warmup)
    parser.add_argument(
        "--threads",
        type=lambda s: tuple(int(x) for x in s.split(",") if x),
        default=d.threads,
        help="comma-separated caller counts, e.g. 8,32",
    )
    parser.add_argument("--conc-count", type=int, default=d.conc_count)
    parser.add_argument("--conc-duration", type=float, default=d.conc_duration_s)
    parser.add_argument("--conc-warmup", type=int, default=d.conc_warmup_per_thread)


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Build a :class:`Plan` from options added by :func:`add_plan_args`."""
    return Plan(
        seq_n=args.seq_n,
        seq_warmup=args.seq_warmup,
        threads=tuple(args.threads),
        conc_count=args.conc_count if args.conc_count > 0 else None,
        conc_duration_s=args.conc_duration if args.conc_duration > 0 else None,
        conc_warmup_per_thread=args.conc_warmup,
    )


def run_plan(one: SagaFn, plan: Plan) -> dict[str, Any]:
    """Run one scenario through the whole plan: sequential, then each thread count.

    Returns ``{"sequential": {...}, "concurrent": {"8": {...}, "32": {...}}}``.
    """
    result: dict[str, Any] = {"sequential": run_sequential(one, plan.seq_n, plan.seq_warmup)}
    result["concurrent"] = {
        str(c): run_concurrent(
            one, c, plan.conc_count, plan.conc_duration_s, plan.conc_warmup_per_thread
        )
        for c in plan.threads
    }
    return result


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-ready dict, echoed in every variant's output."""
    return {
        "seq_n": plan.seq_n,
        "seq_warmup": plan.seq_warmup,
        "threads": list(plan.threads),
        "conc_count": plan.conc_count,
        "conc_duration_s": plan.conc_duration_s,
        "conc_warmup_per_thread": plan.conc_warmup_per_thread,
    }


@dataclass(frozen=True)
class Scenario:
    """One saga shape to measure (e.g. 'success', 'compensating').

    ``reset`` runs before the plan (e.g. truncate tables); ``verify`` runs after
    it and returns a JSON-ready dict that must contain a boolean ``"ok"``.
    """

    one: SagaFn
    reset: Callable[[], None] | None = None
    verify: Callable[[], dict[str, Any]] | None = None


def run_scenario(scenario: Scenario, plan: Plan) -> dict[str, Any]:
    """Reset, run the plan, verify; returns the plan result plus ``"check"``."""
    if scenario.reset is not None:
        scenario.reset()
    result = run_plan(scenario.one, plan)
    result["check"] = scenario.verify() if scenario.verify is not None else {"ok": None}
    return result


def variant_document(
    variant: str,
    plan: Plan,
    scenarios: dict[str, Scenario],
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every scenario and wrap the results in the shared variant JSON shape."""
    return {
        "variant": variant,
        "meta": meta or {},
        "plan": plan_dict(plan),
        "scenarios": {name: run_scenario(s, plan) for name, s in scenarios.items()},
    }


def emit(document: dict[str, Any]) -> None:
    """Print ``document`` as ONE line of JSON: the runner reads a variant's last stdout line."""
    print(json.dumps(document, separators=(",", ":")), flush=True)
