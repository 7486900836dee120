"""The saga and the participants of bench/remote_bench.py, for ``saga -A remote_bench_app``.

``trip``: three remote steps, ``hotel.book``, ``flight.book``, ``car.book``,
each answered by a participant process of its own. A handler makes one
record (an INSERT into ``bench_effects``) behind the engine's
:class:`~engine.IdempotencyGuard`, the way a real participant would, and
notes when it started, so the benchmark can measure how long a command took
to reach its participant. With ``REMOTE_BENCH_WORK=none`` a handler only
replies (no database), to measure the engine's own share.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from engine import IdempotencyGuard, Saga, StepContext
from engine.remote.participant import ParticipantRuntime, ParticipantService
from engine.settings import Settings
from engine.store import open_store

STEPS = ("hotel", "flight", "car")

trip = Saga("trip", default_timeout=timedelta(seconds=30))
for _step in STEPS:
    trip.remote_step(_step, f"{_step}.book", compensation=f"{_step}.cancel")

effects = sa.Table(
    "bench_effects",
    sa.MetaData(),
    sa.Column("idem_key", sa.String(300), primary_key=True),
    sa.Column("saga_id", sa.String(36), nullable=False),
    sa.Column("step", sa.String(20), nullable=False),
    sa.Column("received_ms", sa.BigInteger, nullable=False),
)

service = ParticipantService("bench")
_guards: list[IdempotencyGuard] = []  # set by init_participant


def init_participant(runtime: ParticipantRuntime) -> None:
    settings = runtime.settings or Settings.from_env()
    db = open_store(settings.database_url, pool_size=runtime.concurrency).db
    _guards.append(IdempotencyGuard(db, scope="bench"))


_INSERT = effects.insert()


def _book(ctx: StepContext) -> dict[str, Any]:
    received = time.time_ns() // 1_000_000
    if os.environ.get("REMOTE_BENCH_WORK") == "none":
        return {"ref": ctx.idempotency_key, "received_ms": received}
    assert _guards, "init_participant was not called"

    def insert(conn: Connection) -> dict[str, Any]:
        row = {
            "idem_key": ctx.idempotency_key,
            "saga_id": ctx.saga_id,
            "step": ctx.step,
            "received_ms": received,
        }
        conn.execute(_INSERT, row)
        return {"ref": ctx.idempotency_key, "received_ms": received}

    return _guards[0].run_once(ctx.idempotency_key, insert)


def _cancel(ctx: StepContext, output: Any) -> None:
    return None


for _step in STEPS:
    service.add_handler(f"{_step}.book", _book)
    service.add_handler(f"{_step}.cancel", _cancel)
