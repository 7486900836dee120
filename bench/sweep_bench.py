"""Sweep benchmark: one full sweep pass and one metrics scrape on a 1,000,000-instance store.

Seeds a PostgreSQL store (database ``bench_sweeps``, dropped and recreated)
with :func:`console_bench.seed`, but with 1% of the instances active (0.7%
running, 0.3% compensating; 5% failed with an open dead letter; the rest
finished), then:

- marks 20 active instances as begun by a worker that died (an attempt
  running, its lease expired), as after a crash;
- warms the process up (a pass in batches of one), then times the first
  full passes (:meth:`Sweeps.run_all`, every sweep once) in full batches:
  the dispatch sweep settles the 20 dead attempts and rings 200 unclaimed
  instances, the stuck sweep flags 200 instances, the dead-letter sweep
  plans 200 dead letters (``refund``'s with its automatic retry policy,
  the others as "never"), retention purges instances past 29 days for 0.1 s;
- catches up (everything flagged and planned), vacuums as autovacuum
  would, then times steady passes, where the sweeps find nothing new (the
  dispatch sweep still rings 200 unclaimed instances each pass: no worker
  runs here);
- times a metrics scrape (:func:`engine.metrics.exposition` with the store
  gauges), the way ``/metrics`` renders it.

Prints one JSON document (milliseconds) and saves it under ``bench/results/``.
The issue's targets: a full pass <= 500 ms, a scrape <= 100 ms.

    python bench/sweep_bench.py                   # 1,000,000 instances, ~5 min to seed
    python bench/sweep_bench.py --instances 100000
    python bench/sweep_bench.py --reuse           # skip seeding, reuse the database
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import console_bench
import pgutil

from engine import Retry, Saga, SagaEngine, Settings, StepKind, metrics
from engine.store.migrate import upgrade
from engine.sweeper.passes import Sweeps

DB = "bench_sweeps"
#: console_bench's mix with 1% active: its seed reads this module attribute.
STATES = [
    ("completed", 0.80),
    ("compensated", 0.10),
    ("running", 0.007),
    ("compensating", 0.003),
    ("failed", 0.05),
    ("cancelled", 0.04),
]
DEAD_WORKER_INSTANCES = 20
TARGET_PASS_MS = 500
TARGET_SCRAPE_MS = 100


def sagas() -> list[Saga]:
    """console_bench's five saga types; ``refund`` retries its dead letters automatically,
    after 90 days: the sweep plans every one of them, and retries none during the run."""
    made = []
    for name in console_bench.SAGA_NAMES:
        policy = Retry(
            max_attempts=3, initial_delay=timedelta(days=90), max_delay=timedelta(days=90)
        )
        saga = Saga(name, dead_letter_retry=policy if name == "refund" else None)
        saga.add_step(console_bench.STEPS[0], lambda ctx: None, lambda ctx, out: None)
        saga.add_step(console_bench.STEPS[1], lambda ctx: None, kind=StepKind.PIVOT)
        saga.add_step(console_bench.STEPS[2], lambda ctx: None)
        made.append(saga)
    return made


def seed(url: str, count: int) -> None:
    console_bench.STATES = STATES
    console_bench.seed(url, count)


def reset(url: str, now: int) -> None:
    """Undo what earlier runs' sweeps did (flags, plans), and stage the dead worker."""
    db = sa.create_engine(url)
    with db.begin() as c:
        c.execute(
            sa.text(
                "DELETE FROM saga_events WHERE kind = 'stuck_detected' AND saga_id IN "
                "(SELECT id FROM saga_instances WHERE stuck_since IS NOT NULL)"
            )
        )
        c.execute(sa.text("UPDATE saga_instances SET stuck_since = NULL WHERE stuck_since > 0"))
        c.execute(
            sa.text(
                "UPDATE saga_dead_letters SET auto_retries = NULL, auto_retry_at = NULL "
                "WHERE resolved_at IS NULL AND auto_retries IS NOT NULL"
            )
        )
        _stage_dead_worker(c, now)
    db.dispose()
    vacuum(url)


def _stage_dead_worker(c: sa.Connection, now: int) -> None:
    # Running instances at their current step with an attempt begun a minute ago by a
    # worker whose lease ran out 30 s ago.
    picked = (
        "SELECT id FROM saga_instances WHERE state = 'running' ORDER BY created_at DESC "
        f"LIMIT {DEAD_WORKER_INSTANCES + 1}"  # one more for the warm-up pass
    )
    c.execute(
        sa.text(
            "UPDATE saga_instances SET lease_owner = 'dead-worker', lease_expires_at = :expired, "
            f"next_run_at = :deadline WHERE id IN ({picked})"
        ),
        {"expired": now - 30_000, "deadline": now + 60_000},
    )
    c.execute(
        sa.text(
            "UPDATE saga_steps AS s SET status = 'running', started_at = :began, "
            "deadline_at = :deadline, attempts = s.attempts + 1 FROM saga_instances AS i "
            "WHERE s.saga_id = i.id AND s.step_index = i.current_step "
            "AND i.lease_owner = 'dead-worker'"
        ),
        {"began": now - 60_000, "deadline": now + 60_000},
    )


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return (time.perf_counter() - started) * 1000, result


def one_pass(sweeps: Sweeps) -> dict[str, Any]:
    """Every sweep once, timed each and in total."""
    per_sweep: dict[str, float] = {}
    did: dict[str, dict[str, int]] = {}
    began = time.perf_counter()
    for name in ("dispatch", "stuck", "dead_letters", "retention"):
        ms, counts = timed(lambda n=name: sweeps.run(n))
        per_sweep[name] = round(ms, 1)
        did[name] = {k: v for k, v in counts.items() if v}
    total = round((time.perf_counter() - began) * 1000, 1)
    return {"total_ms": total, "per_sweep_ms": per_sweep, "did": did}


def catch_up(engine: SagaEngine) -> int:
    """Flag and plan everything there is, with large batches, so the next passes are steady."""
    big = _with(engine, sweep_batch=5000).sweeps()
    passes = 0
    while True:
        passes += 1
        did = big.run("stuck")["flagged"] + big.run("dead_letters")["planned"]
        if did == 0:
            return passes


def vacuum(url: str) -> None:
    db = sa.create_engine(url)
    with db.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(sa.text("VACUUM ANALYZE saga_instances"))
        c.execute(sa.text("VACUUM ANALYZE saga_dead_letters"))
    db.dispose()


def _with(engine: SagaEngine, **changes: Any) -> SagaEngine:
    return SagaEngine(
        engine.registry,
        settings=replace(engine.settings, **changes),
        store=engine.store,
        transport=engine.transport,
    )


def scrape_times(engine: SagaEngine, runs: int) -> dict[str, Any]:
    collector = metrics.StoreCollector(engine.store, engine.registry.names)
    for _ in range(3):
        metrics.exposition(collector)
    samples = sorted(timed(lambda: metrics.exposition(collector))[0] for _ in range(runs))
    body = metrics.exposition(collector).decode()
    parsed = metrics.values(body)
    return {
        "p50_ms": round(statistics.median(samples), 1),
        "p95_ms": round(samples[max(int(len(samples) * 0.95) - 1, 0)], 1),
        "max_ms": round(samples[-1], 1),
        "runs": runs,
        "bytes": len(body),
        "instances_gauged": int(metrics.total(parsed, "saga_instances")),
        "stuck_gauged": int(metrics.total(parsed, "saga_stuck_instances")),
        "dead_letter_depth": int(metrics.total(parsed, "saga_dead_letter_depth")),
    }


def summary(passes: list[dict[str, Any]]) -> dict[str, Any]:
    totals = sorted(p["total_ms"] for p in passes)
    return {
        "p50_ms": round(statistics.median(totals), 1),
        "max_ms": totals[-1],
        "passes": passes,
    }


def measure(url: str, cold_passes: int, steady_passes: int, scrape_runs: int) -> dict[str, Any]:
    settings = Settings(
        database_url=url, worker_id="bench-sweeper", retention_days=29.0, concurrency=4
    )
    engine = SagaEngine(sagas(), settings=settings)
    try:
        # A sweeper runs for days: warm its connections and statement caches first, with
        # a pass of batches of one (it settles the extra dead attempt, flags one, ...).
        _with(engine, sweep_batch=1).sweeps().run_all()
        cold = [one_pass(engine.sweeps()) for _ in range(cold_passes)]
        caught_up_in = catch_up(engine)
        vacuum(url)  # what autovacuum does after the catch-up's updates
        steady_engine = _with(engine, retention_days=60.0)  # nothing left to purge
        steady = [one_pass(steady_engine.sweeps()) for _ in range(steady_passes)]
        scrape = scrape_times(engine, scrape_runs)
    finally:
        engine.close()
    return {
        "first_passes": summary(cold),
        "catch_up_passes": caught_up_in,
        "steady_passes": summary(steady),
        "scrape": scrape,
    }


def _log(message: str) -> None:
    print(f"[sweep_bench] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--passes", type=int, default=5, help="timed passes, first and steady")
    parser.add_argument("--scrapes", type=int, default=50, help="timed scrapes")
    parser.add_argument("--reuse", action="store_true", help="reuse the seeded database")
    args = parser.parse_args()
    url = pgutil.sqlalchemy_url(DB)
    if not args.reuse:
        pgutil.recreate_database(DB)
        upgrade(url)
        seed(url, args.instances)
    upgrade(url)
    reset(url, int(time.time() * 1000))
    _log("measuring")
    results = measure(url, args.passes, args.passes, args.scrapes)
    worst_pass = max(results["first_passes"]["max_ms"], results["steady_passes"]["max_ms"])
    doc = {
        "benchmark": "sweeps",
        "instances": args.instances,
        "active_share": 0.01,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "postgres": pgutil.server_version(),
        "target_pass_ms": TARGET_PASS_MS,
        "target_scrape_ms": TARGET_SCRAPE_MS,
        **results,
        "passes_within_target": worst_pass <= TARGET_PASS_MS,
        "scrape_within_target": results["scrape"]["p95_ms"] <= TARGET_SCRAPE_MS,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"sweeps-{doc['at'].replace(':', '')}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
