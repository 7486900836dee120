"""Console benchmark: server time of the console's pages over a store of 1,000,000 instances.

Seeds a PostgreSQL store (database ``bench_console``, dropped and recreated)
with set-based ``INSERT ... SELECT generate_series`` statements: N instances
(3 steps each, a few timeline events each, dead letters for the failed ones,
some operator actions), then times, through the Flask test client (so: the
console's own time, no network), each of:

- the instance list, once per state tab and for "all";
- a search by business key and by correlation id;
- an instance page.

Prints one JSON document with p50/p95/max in milliseconds per page and saves
it under ``bench/results/``. The issue's target is p95 <= 100 ms each.

    python bench/console_bench.py                   # 1,000,000 instances, ~5 min
    python bench/console_bench.py --instances 100000 --runs 50
    python bench/console_bench.py --reuse           # skip seeding, reuse the database
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pgutil

from console import create_app
from engine import Saga, SagaEngine, Settings, StepKind
from engine.store.migrate import upgrade
from engine.users import UserStore

DB = "bench_console"
SAGA_NAMES = ("order", "travel", "refund", "signup", "payout")
STEPS = ("reserve", "charge", "ship")
# state, share of instances (sums to 1), current step, step status per index
STATES = [
    ("completed", 0.70),
    ("compensated", 0.10),
    ("running", 0.08),
    ("compensating", 0.03),
    ("failed", 0.05),
    ("cancelled", 0.04),
]
DAY_MS = 86_400_000


def seed(url: str, count: int) -> None:
    """Fill the store with ``count`` instances, set-based, then ANALYZE."""
    db = sa.create_engine(url)
    now = int(time.time() * 1000)
    started = time.perf_counter()
    with db.begin() as c:
        c.execute(sa.text(_instances_sql()), {"n": count, "now": now, "span": 30 * DAY_MS})
        _log(f"instances: {time.perf_counter() - started:.0f} s")
        c.execute(sa.text(_steps_sql()))
        _log(f"steps: {time.perf_counter() - started:.0f} s")
        c.execute(sa.text(_events_sql()))
        _log(f"events: {time.perf_counter() - started:.0f} s")
        c.execute(sa.text(_dead_letters_sql()))
        c.execute(sa.text(_operator_actions_sql()))
        _log(f"dead letters and audit: {time.perf_counter() - started:.0f} s")
    with db.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(sa.text("VACUUM ANALYZE"))
    _log(f"seeded {count:,} instances in {time.perf_counter() - started:.0f} s")
    db.dispose()


def _state_case() -> str:
    # A deterministic state per row from its number, in the STATES proportions.
    parts, edge = [], 0.0
    for state, share in STATES[:-1]:
        edge += share
        parts.append(f"WHEN (g % 1000) < {int(edge * 1000)} THEN '{state}'")
    return "CASE " + " ".join(parts) + f" ELSE '{STATES[-1][0]}' END"


def _instances_sql() -> str:
    names = "ARRAY[" + ",".join(f"'{n}'" for n in SAGA_NAMES) + "]"
    return f"""
    INSERT INTO saga_instances (id, saga_name, saga_version, state, current_step, step_count,
        payload, correlation_id, business_key, idempotency_key, version, created_at,
        updated_at, last_progress_at, next_run_at, lease_owner, lease_expires_at)
    SELECT md5('i' || g)::uuid::text, ({names})[1 + g % {len(SAGA_NAMES)}], 1, s.state,
        CASE WHEN s.state IN ('completed', 'failed') THEN 2 ELSE g % 2 END, 3,
        jsonb_build_object('amount', g % 500, 'customer', 'c-' || (g % 9973)),
        md5('c' || g)::uuid::text, 'ORD-' || g, NULL, 5, t.at, t.at + 900, t.at + 900,
        CASE WHEN s.state IN ('running', 'compensating') THEN t.at + 60000 END, NULL, NULL
    FROM generate_series(1, :n) AS g
    CROSS JOIN LATERAL (SELECT {_state_case()} AS state) AS s
    CROSS JOIN LATERAL (SELECT :now - (:span * g::bigint / :n) AS at) AS t
    """


def _steps_sql() -> str:
    names = "ARRAY[" + ",".join(f"'{n}'" for n in STEPS) + "]"
    return f"""
    INSERT INTO saga_steps (saga_id, step_index, name, status, attempts, attempts_base,
        started_at, finished_at, deadline_at, output, error, comp_status, comp_attempts,
        comp_attempts_base, comp_started_at, comp_finished_at, comp_deadline_at, comp_error)
    SELECT i.id, k, ({names})[k + 1],
        CASE WHEN k < i.current_step OR i.state = 'completed' THEN 'succeeded'
             WHEN k = i.current_step AND i.state = 'failed' THEN 'failed'
             ELSE 'pending' END,
        CASE WHEN k <= i.current_step THEN 1 ELSE 0 END, 0,
        i.created_at + k * 300, i.created_at + k * 300 + 250, NULL,
        CASE WHEN k < i.current_step THEN jsonb_build_object('ref', 'R-' || i.business_key) END,
        CASE WHEN k = i.current_step AND i.state = 'failed' THEN 'carrier rejected parcel' END,
        CASE WHEN i.state = 'compensated' AND k < i.current_step THEN 'compensated'
             ELSE 'not_needed' END, 0, 0, NULL, NULL, NULL, NULL
    FROM saga_instances AS i CROSS JOIN generate_series(0, 2) AS k
    """


def _events_sql() -> str:
    return """
    INSERT INTO saga_events (saga_id, correlation_id, at, kind, step_index, step_name, phase,
        attempt, actor, error, traceback, detail)
    SELECT i.id, i.correlation_id, i.created_at + e.k * 100, e.kind, e.step, e.step_name,
        e.phase, e.attempt, 'bench-worker', NULL, NULL, NULL
    FROM saga_instances AS i
    CROSS JOIN (VALUES (0, 'saga_started', NULL, NULL, NULL, NULL),
                       (1, 'attempt_started', 0, 'reserve', 'action', 1),
                       (2, 'attempt_succeeded', 0, 'reserve', 'action', 1))
        AS e(k, kind, step, step_name, phase, attempt)
    """


def _dead_letters_sql() -> str:
    return """
    INSERT INTO saga_dead_letters (saga_id, saga_name, step_index, step_name, phase, error,
        traceback, attempts, created_at)
    SELECT id, saga_name, 2, 'ship', 'action', 'carrier rejected parcel', NULL, 3, updated_at
    FROM saga_instances WHERE state = 'failed'
    """


def _operator_actions_sql() -> str:
    return """
    INSERT INTO saga_operator_actions (at, actor, action, saga_id, reason, state_before,
        state_after, version_before, version_after, step_name, detail)
    SELECT updated_at, 'oncall-' || (hashtext(id) & 7), 'cancel', id, 'customer cancelled',
        'running', 'cancelled', 4, 5, 'charge', NULL
    FROM saga_instances WHERE state = 'cancelled'
    """


def _sagas() -> list[Saga]:
    sagas = []
    for name in SAGA_NAMES:
        saga = Saga(name)
        saga.add_step(STEPS[0], lambda ctx: None, lambda ctx, out: None)
        saga.add_step(STEPS[1], lambda ctx: None, kind=StepKind.PIVOT)
        saga.add_step(STEPS[2], lambda ctx: None)
        sagas.append(saga)
    return sagas


def measure(url: str, count: int, runs: int) -> dict[str, Any]:
    """p50/p95/max server time per page, through the Flask test client."""
    engine = SagaEngine(_sagas(), settings=Settings(database_url=url, concurrency=4))
    app = create_app({"SAGA_ENGINE": engine, "SECRET_KEY": "bench", "WTF_CSRF_ENABLED": False})
    users = UserStore(engine.store.db)
    if users.by_name("bench") is None:
        users.add("bench", "bench password", "operator")
    client = app.test_client()
    client.post("/login", data={"name": "bench", "password": "bench password"})
    rand = random.Random(7)
    pages: dict[str, Any] = {"list all": lambda: "/sagas"}
    for state, _share in STATES:
        pages[f"list {state}"] = lambda s=state: f"/sagas?state={s}"
    pages["list page 20 (cursor)"] = _deep_page(client, 20)
    pages["search business key"] = lambda: f"/search?q=ORD-{rand.randint(1, count)}"
    pages["search correlation id"] = lambda: f"/search?q={_uuid('c', rand.randint(1, count))}"
    pages["instance page"] = lambda: f"/sagas/{_uuid('i', rand.randint(1, count))}"
    results = {name: _time(client, make, runs) for name, make in pages.items()}
    engine.close()
    return results


def _deep_page(client: Any, depth: int) -> Any:
    path = "/sagas"
    for _ in range(depth - 1):
        html = client.get(path).get_data(as_text=True)
        marker = html.split('">Older')[0].rsplit('href="', 1)[1]
        path = marker.replace("&amp;", "&")
    return lambda: path


def _uuid(prefix: str, n: int) -> str:
    import hashlib
    import uuid

    return str(uuid.UUID(hashlib.md5(f"{prefix}{n}".encode()).hexdigest()))


def _time(client: Any, make: Any, runs: int) -> dict[str, float]:
    for _ in range(3):
        client.get(make())
    samples = []
    for _ in range(runs):
        path = make()
        start = time.perf_counter()
        response = client.get(path)
        samples.append((time.perf_counter() - start) * 1000)
        if response.status_code != 200:
            raise SystemExit(f"{path} answered {response.status_code}")
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 1),
        "p95_ms": round(samples[max(int(len(samples) * 0.95) - 1, 0)], 1),
        "max_ms": round(samples[-1], 1),
        "runs": runs,
    }


def _log(message: str) -> None:
    print(f"[console_bench] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=100, help="timed requests per page")
    parser.add_argument("--reuse", action="store_true", help="reuse the seeded database")
    args = parser.parse_args()
    url = pgutil.sqlalchemy_url(DB)
    if not args.reuse:
        pgutil.recreate_database(DB)
        upgrade(url)
        seed(url, args.instances)
    results = measure(url, args.instances, args.runs)
    doc = {
        "benchmark": "console",
        "instances": args.instances,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "target_p95_ms": 100,
        "pages": results,
        "all_within_target": all(r["p95_ms"] <= 100 for r in results.values()),
    }
    text = json.dumps(doc, indent=2)
    print(text)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"console-{doc['at'].replace(':', '')}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
