"""Remote participants over Redis: sagas per second, and how long a command takes to arrive.

The set-up the issue asks for: 2 ``saga worker`` processes and 3 ``saga
participant`` processes (hotel, flight, car), one PostgreSQL store, commands
and replies on Redis Streams, all on this machine. The saga
(bench/remote_bench_app.py) has three remote steps. The benchmark process
starts the sagas from a few threads as fast as it can and waits until all of
them completed. It runs two variants, one after the other, each on a fresh
database with fresh processes:

- participants that only reply: what the engine itself costs (start, send the
  commands, read and record the replies, move on), with the participant
  runtime around handlers that do nothing;
- participants that make one record per command (an INSERT) behind the
  idempotency guard, as a real service would: its transaction runs on the
  same two cores and the same PostgreSQL.

For each it reports:

- ``sagas_per_s``: measured sagas / (last completion - first start), from the
  timestamps the store recorded;
- ``dispatch_ms``: per step, from the attempt's start (stored just before the
  commit after which the command is sent) to the moment the participant's
  handler began: commit, XADD, XREADGROUP and queueing, p50/p95/p99;
- ``step_ms``: per step, from the attempt's start to its recorded success (the
  whole round trip, the participant's own transaction included);
- ``saga_ms``: per saga, from its start to its completion;
- ``cpu_ms_per_saga``: CPU time each process (PostgreSQL and Redis included)
  spent per measured saga.

Run it with the project venv (PostgreSQL on 127.0.0.1:5432 and Redis on
127.0.0.1:6379 by default)::

    .venv/bin/python bench/remote_bench.py                 # both variants, 3000 sagas each
    .venv/bin/python bench/remote_bench.py --work guard --rate 50   # latency at a steady rate

It drops and recreates the database ``bench_remote``, uses a fresh key prefix
on Redis and deletes its keys at the end, prints one JSON list (a document
per variant) as its last line, and saves it under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import redis  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from pgutil import recreate_database, server_version, sqlalchemy_url  # noqa: E402
from remote_bench_app import STEPS, effects, trip  # noqa: E402

from engine import SagaEngine, Settings  # noqa: E402
from engine.store import schema as t  # noqa: E402
from engine.store.migrate import upgrade  # noqa: E402

DBNAME = "bench_remote"


def main() -> None:
    args = parse_args()
    works = ("none", "guard") if args.work == "both" else (args.work,)
    docs = [measure(args, work) for work in works]
    emit(docs)


def measure(args: argparse.Namespace, work: str) -> dict[str, Any]:
    """One variant, on a fresh database and key prefix, with its own processes."""
    url = sqlalchemy_url(DBNAME)
    recreate_database(DBNAME)
    upgrade(url)
    db = sa.create_engine(url)
    effects.create(db)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    env = {
        "SAGA_DATABASE_URL": url,
        "SAGA_REDIS_URL": args.redis_url,
        "SAGA_REDIS_PREFIX": prefix,
        "SAGA_LOG_LEVEL": "WARNING",
        "REMOTE_BENCH_WORK": work,
    }
    procs = Processes(env, HERE / "results" / f"remote-logs-{prefix}")
    try:
        for n in range(args.workers):
            procs.start(f"worker-{n}", "worker", concurrency=args.worker_concurrency)
        for step in STEPS:
            procs.start(
                f"participant-{step}",
                "participant",
                f"--service={step}",
                concurrency=args.participant_concurrency,
            )
        engine = SagaEngine(
            [trip],
            settings=Settings(
                database_url=url,
                redis_url=args.redis_url,
                redis_prefix=prefix,
                worker_id="bench-starter",
                concurrency=args.starters,
            ),
        )
        try:
            run(engine, args.warmup, args.starters)
            began = engine.clock()
            loadavg_before = os.getloadavg()
            cpu_before = procs.cpu_seconds()
            run(engine, args.sagas, args.starters, args.rate)
            cpu = {k: v - cpu_before.get(k, 0.0) for k, v in procs.cpu_seconds().items()}
            loadavg_after = os.getloadavg()
            doc = report(db, began, args, work, loadavg_before, loadavg_after)
            doc["cpu_ms_per_saga"] = {
                name: round(seconds * 1000 / args.sagas, 2) for name, seconds in sorted(cpu.items())
            }
        finally:
            engine.close()
    finally:
        procs.stop()
        cleanup(args.redis_url, prefix)
        db.dispose()
    return doc


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sagas", type=int, default=3000, help="sagas measured")
    parser.add_argument("--warmup", type=int, default=200, help="sagas run first, not measured")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-concurrency", type=int, default=16)
    parser.add_argument("--participant-concurrency", type=int, default=8)
    parser.add_argument("--starters", type=int, default=4, help="threads starting sagas")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="sagas started per second (default 0: as fast as possible, for throughput; "
        "a moderate rate shows the latencies without queueing)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--work",
        choices=("both", "guard", "none"),
        default="both",
        help="what a participant does per command: nothing but reply (the engine's own "
        "share), one INSERT behind the idempotency guard, or both, one after the other "
        "(the default)",
    )
    return parser.parse_args()


def run(engine: SagaEngine, total: int, threads: int, rate: float = 0.0) -> None:
    """Start ``total`` sagas from ``threads`` threads (``rate`` a second in all, or as fast
    as they can when 0), then wait until every one completed."""
    ids: list[str] = []
    lock = threading.Lock()
    pause = threads / rate if rate > 0 else 0.0

    def starter(count: int) -> None:
        due = time.monotonic()
        for _ in range(count):
            saga_id = engine.start("trip", {}).id
            with lock:
                ids.append(saga_id)
            due += pause
            time.sleep(max(0.0, due - time.monotonic()))

    shares = [total // threads + (1 if i < total % threads else 0) for i in range(threads)]
    pool = [threading.Thread(target=starter, args=(n,)) for n in shares]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    i = t.instances.c
    while True:
        with engine.store.db.connect() as conn:
            left = conn.execute(
                sa.select(sa.func.count()).where(i.id.in_(ids), i.state != "completed")
            ).scalar_one()
        if left == 0:
            return
        time.sleep(0.1)


def report(
    db: sa.Engine,
    began: int,
    args: argparse.Namespace,
    work: str,
    loadavg_before: tuple[float, float, float],
    loadavg_after: tuple[float, float, float],
) -> dict[str, Any]:
    e, i = t.events.c, t.instances.c
    measured = sa.select(i.id).where(i.created_at >= began).scalar_subquery()
    with db.connect() as conn:
        first, last, count = conn.execute(
            sa.select(sa.func.min(i.created_at), sa.func.max(i.updated_at), sa.func.count()).where(
                i.created_at >= began
            )
        ).one()
        saga_ms = [
            row[0]
            for row in conn.execute(
                sa.select(i.updated_at - i.created_at).where(i.created_at >= began)
            )
        ]
        # Each handler returns when it began; the attempt's start is on its step row.
        received = sa.cast(t.steps.c.output["received_ms"].as_string(), sa.BigInteger)
        dispatch = (
            conn.execute(
                sa.select(received - t.steps.c.started_at).where(t.steps.c.saga_id.in_(measured))
            )
            .scalars()
            .all()
        )
        started = (
            sa.select(e.saga_id, e.step_name, e.at)
            .where(e.kind == "attempt_started", e.saga_id.in_(measured))
            .subquery()
        )
        step_ms = (
            conn.execute(
                sa.select(e.at - started.c.at)
                .join(
                    started,
                    sa.and_(started.c.saga_id == e.saga_id, started.c.step_name == e.step_name),
                )
                .where(e.kind == "attempt_succeeded", e.saga_id.in_(measured))
            )
            .scalars()
            .all()
        )
    elapsed = (last - first) / 1000
    return {
        "variant": "remote",
        "host": {
            "cpus": os.cpu_count(),
            "loadavg_before": loadavg_before,
            "loadavg_after": loadavg_after,
        },
        "meta": {"postgres": server_version(), "redis": redis_version(args.redis_url)},
        "plan": {
            "sagas": args.sagas,
            "warmup": args.warmup,
            "workers": args.workers,
            "worker_concurrency": args.worker_concurrency,
            "participants": len(STEPS),
            "participant_concurrency": args.participant_concurrency,
            "starters": args.starters,
            "rate_per_s": args.rate or None,
            "steps_per_saga": len(STEPS),
            "participant_work": work,
        },
        "completed": count,
        "elapsed_s": round(elapsed, 3),
        "sagas_per_s": round(count / elapsed, 1) if elapsed else None,
        "dispatch_ms": percentiles(dispatch),
        "step_ms": percentiles(step_ms),
        "saga_ms": percentiles(saga_ms),
    }


def percentiles(values: list[int] | Any) -> dict[str, float | None]:
    data = sorted(values)
    if not data:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "n": 0}

    def pick(q: float) -> float:
        return float(data[min(len(data) - 1, int(q * len(data)))])

    return {
        "p50": pick(0.50),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "mean": round(statistics.fmean(data), 2),
        "n": len(data),
    }


class Processes:
    """``saga`` processes run from bench/, stopped with SIGTERM at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.running: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, command: str, *argv: str, concurrency: int) -> None:
        env = {
            **os.environ,
            **self.env,
            "SAGA_WORKER_ID": name,
            "SAGA_CONCURRENCY": str(concurrency),
            "PYTHONPATH": str(ROOT),
        }
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "-A", "remote_bench_app", command, *argv],
            cwd=HERE,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        self.running.append((name, proc, log))
        give_up = time.monotonic() + 30
        while b"Ctrl-C to stop" not in (self.logs / f"{name}.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(f"{name} did not start: see {self.logs / f'{name}.log'}")
            time.sleep(0.05)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by each process, this one (``bench``), PostgreSQL's
        backends (``postgres``) and Redis (``redis``) among them, other clients' included."""
        tick = os.sysconf("SC_CLK_TCK")
        found = {name: _cpu(proc.pid, tick) for name, proc, _ in self.running}
        found["bench"] = _cpu(os.getpid(), tick)
        found["postgres"] = sum(_cpu(pid, tick) for pid in _named_pids("postgres"))
        found["redis"] = sum(_cpu(pid, tick) for pid in _named_pids("redis-server"))
        return found

    def stop(self) -> None:
        for _, proc, _ in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc, log in self.running:
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            log.close()
            if code != 0:
                print(f"{name} exited with {code}: see {log.name}", file=sys.stderr)


def _cpu(pid: int, tick: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / tick  # utime + stime


def _named_pids(command: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == command:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def redis_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()


def cleanup(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def emit(docs: list[dict[str, Any]]) -> None:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = HERE / "results" / f"remote-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(docs, indent=2) + "\n")
    for doc in docs:
        d, s = doc["dispatch_ms"], doc["step_ms"]
        cpu = sum(doc["cpu_ms_per_saga"].values())
        print(
            f"participants {WORK_LABELS[doc['plan']['participant_work']]}: "
            f"{doc['completed']} sagas in {doc['elapsed_s']}s, {doc['sagas_per_s']} sagas/s; "
            f"dispatch p50 {d['p50']} ms, p99 {d['p99']} ms; step round trip p50 {s['p50']} ms, "
            f"p99 {s['p99']} ms; CPU {cpu:.1f} ms a saga (all processes)",
            file=sys.stderr,
        )
    print(f"saved to {out.relative_to(ROOT)}", file=sys.stderr)
    print(json.dumps(docs))


WORK_LABELS = {"none": "only reply", "guard": "INSERT behind the guard"}


if __name__ == "__main__":
    main()
