"""Choreography over Redis: domain events per second through the bus and the tracker.

The set-up the issue asks for: the three participant services of
examples/order_fulfillment_choreography.py (inventory, payment, shipping),
each a ``saga participant`` process, plus the tracker as a fourth process
(``--service choreography-tracker``), one PostgreSQL database, events on one
Redis stream. The benchmark publishes ``OrderPlaced`` events as fast as it can
and waits until the tracker shows every order completed.

An order is 4 events (OrderPlaced, InventoryReserved, PaymentCharged,
OrderShipped); each event is read by 4 consumer groups (the 3 services and
the tracker), so an order is 16 deliveries, 3 guarded effects and 4 tracker
transitions. It reports:

- ``orders_per_s``: orders / (last completion - first publish);
- ``events_per_s``: events published per second over the same span;
- ``deliveries_per_s``: events read and handled by a group, per second;
- ``order_ms``: per order, from OrderPlaced (the tracked instance's creation)
  to its last transition (OrderShipped applied), p50/p95/p99.

Run it with the project venv (PostgreSQL on 127.0.0.1:5432, Redis on
127.0.0.1:6379 by default)::

    .venv/bin/python bench/choreography_bench.py               # 2000 orders
    .venv/bin/python bench/choreography_bench.py --orders 500

It drops and recreates the database ``bench_choreo``, uses a fresh key prefix
on Redis and deletes its keys at the end, and prints one JSON document as its
last line (also saved under bench/results/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import redis  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from pgutil import recreate_database, sqlalchemy_url  # noqa: E402

import examples.order_fulfillment_choreography as example  # noqa: E402
from engine.choreography.handlers import EventBus  # noqa: E402
from engine.store import schema as t  # noqa: E402
from engine.store.migrate import upgrade  # noqa: E402
from engine.transport.event_log import RedisEventLog  # noqa: E402
from tests.helpers.procs import Processes, participant  # noqa: E402

DBNAME = "bench_choreo"
APP = "examples.order_fulfillment_choreography"
SERVICES = ("inventory", "payment", "shipping", "choreography-tracker")
EVENTS_PER_ORDER = 4


def main() -> None:
    args = parse_args()
    url = sqlalchemy_url(DBNAME)
    recreate_database(DBNAME)
    upgrade(url)
    db = sa.create_engine(url)
    example.create_tables(db)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    env = {
        "SAGA_DATABASE_URL": url,
        "SAGA_REDIS_URL": args.redis_url,
        "SAGA_REDIS_PREFIX": prefix,
        "SAGA_LOG_LEVEL": "WARNING",
    }
    log_ = RedisEventLog(args.redis_url, prefix=prefix)
    bus = EventBus(log_)
    with tempfile.TemporaryDirectory() as logs:
        procs = Processes(Path(logs), env)
        try:
            for service in SERVICES:
                participant(procs, service, APP, service)
            publish(bus, args.warmup, "warm")
            wait_completed(db, args.warmup)
            began = time.time()
            publish(bus, args.orders, "order")
            wait_completed(db, args.warmup + args.orders)
            doc = report(db, began, args)
        finally:
            procs.close()
            cleanup(args.redis_url, prefix)
            log_.close()
            db.dispose()
    emit(doc)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--orders", type=int, default=2000, help="orders measured")
    parser.add_argument("--warmup", type=int, default=100, help="orders run first, not measured")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    return parser.parse_args()


def publish(bus: EventBus, total: int, tag: str) -> None:
    for n in range(total):
        example.place_order(bus, f"{tag}-{n}", sku=f"SKU-{n % 50}")


def wait_completed(db: sa.Engine, total: int, timeout: float = 900.0) -> None:
    i = t.instances.c
    query = sa.select(sa.func.count()).where(i.kind == "choreographed", i.state == "completed")
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        with db.connect() as c:
            if c.execute(query).scalar_one() >= total:
                return
        time.sleep(0.05)
    raise SystemExit(f"gave up: fewer than {total} orders completed in {timeout}s")


def report(db: sa.Engine, began: float, args: argparse.Namespace) -> dict[str, Any]:
    i = t.instances.c
    with db.connect() as c:
        rows = c.execute(
            sa.select(i.created_at, i.updated_at).where(i.correlation_id.like("order-%"))
        ).all()
    last = max(r.updated_at for r in rows) / 1000
    span = last - began
    order_ms = sorted(r.updated_at - r.created_at for r in rows)
    return {
        "benchmark": "choreography",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "orders": args.orders,
        "processes": list(SERVICES),
        "seconds": round(span, 3),
        "orders_per_s": round(args.orders / span, 1),
        "events_per_s": round(args.orders * EVENTS_PER_ORDER / span, 1),
        "deliveries_per_s": round(args.orders * EVENTS_PER_ORDER * len(SERVICES) / span, 1),
        "order_ms": percentiles(order_ms),
    }


def percentiles(values: list[int]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100)
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "max": float(max(values))}


def cleanup(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def emit(doc: dict[str, Any]) -> None:
    text = json.dumps(doc, sort_keys=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"choreography-{stamp}.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
