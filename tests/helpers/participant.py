"""A participant that keeps its own records, so tests can count effects and spot overlaps.

Every call of an action or compensation is recorded in ``test_calls`` with
its start and end time (an interval per idempotency key: two intervals of
one key that overlap mean a step ran concurrently with itself). The effect
itself is one row in ``test_effects``, written behind the engine's
:class:`~engine.idempotency.IdempotencyGuard`, so it happens once per key
however often the step runs.

What a step does is steered by the instance's payload, so a worker in
another process behaves exactly as the test asked:

``fail``           {step: n}        the first n attempts raise before the effect
                                   ("always": every attempt)
``fatal``          {step: true}     raise NonRetryableError before the effect
``crash_after``    {step: n}        the first n attempts raise after the effect
``comp_fail_while`` {step: path}    the compensation raises while the file exists
``block_while``    {step: path}     after the effect, wait while the file exists
``sleep``          {step: seconds}  after the effect, sleep (to time out)
``pause_ms``       n                sleep up to n ms (random) inside every call
``not_json``       {step: true}     a transactional step returns a value that is not JSON

Transactional steps (:meth:`Participant.transactional`) write their effect
with the engine's own connection instead, so it commits or rolls back with
the step's recorded result; ``fail`` and ``crash_after`` make them raise
after writing.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine as SAEngine

from engine import IdempotencyGuard, NonRetryableError, StepContext, StepFailed
from engine.states import Phase
from engine.store import open_store
from engine.store.schema import BigId

meta = sa.MetaData()

calls = sa.Table(
    "test_calls",
    meta,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(300), nullable=False),
    sa.Column("saga_id", sa.String(36), nullable=False),
    sa.Column("step", sa.String(100), nullable=False),
    sa.Column("phase", sa.String(20), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_ns", sa.BigInteger, nullable=False),
    sa.Column("ended_ns", sa.BigInteger, nullable=True),
    sa.Column("outcome", sa.String(40), nullable=True),
)

effects = sa.Table(
    "test_effects",
    meta,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(300), nullable=False),
    sa.Column("saga_id", sa.String(36), nullable=False),
    sa.Column("step", sa.String(100), nullable=False),
    sa.Column("phase", sa.String(20), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("at_ns", sa.BigInteger, nullable=False),
)


class Participant:
    """Records calls and effects in the store's own database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.db: SAEngine = open_store(url, pool_size=4).db
        meta.create_all(self.db, checkfirst=True)
        self.guard = IdempotencyGuard(self.db, "test-participant")

    def close(self) -> None:
        self.db.dispose()

    # -- what steps call ------------------------------------------------------------

    def action(self, ctx: StepContext) -> dict[str, Any]:
        """The forward side of any test step."""
        return self._call(ctx, self._act)

    def compensation(self, ctx: StepContext, output: Any) -> dict[str, Any]:
        """The compensation side of any test step."""
        return self._call(ctx, self._undo)

    def transactional(self, ctx: StepContext) -> Any:
        """A step that writes with the engine's own connection, inside its transaction."""
        assert ctx.connection is not None
        ctx.connection.execute(
            effects.insert().values(
                key=ctx.idempotency_key,
                saga_id=ctx.saga_id,
                step=ctx.step,
                phase=str(ctx.phase),
                attempt=ctx.attempt,
                at_ns=time.time_ns(),
            )
        )
        if _rule(ctx, "crash_after") is not None and ctx.attempt <= int(_rule(ctx, "crash_after")):
            raise StepFailed(f"{ctx.step}: crashed after writing, attempt {ctx.attempt}")
        if _rule(ctx, "not_json"):
            return {"when": object()}
        failing = _rule(ctx, "fail") if ctx.phase is Phase.ACTION else None
        if failing == "always" or (failing is not None and ctx.attempt <= int(failing)):
            raise StepFailed(f"{ctx.step} refused attempt {ctx.attempt} after writing")
        return {"step": ctx.step}

    def transactional_undo(self, ctx: StepContext, output: Any) -> Any:
        """The compensation of a transactional step, in the engine's transaction too."""
        return self.transactional(ctx)

    # -- behaviour ----------------------------------------------------------------

    def _call(self, ctx: StepContext, body: Any) -> dict[str, Any]:
        call_id = self._record_start(ctx)
        outcome = "raised"
        try:
            result: dict[str, Any] = body(ctx)
            outcome = "returned"
            return result
        finally:
            self._record_end(call_id, outcome)

    def _act(self, ctx: StepContext) -> dict[str, Any]:
        _pause(ctx)
        failing = _rule(ctx, "fail")
        if failing == "always" or (failing is not None and ctx.attempt <= int(failing)):
            raise StepFailed(f"{ctx.step} refused attempt {ctx.attempt}")
        if _rule(ctx, "fatal"):
            raise NonRetryableError(f"{ctx.step} refused for good")
        result = self._effect(ctx)
        crash = _rule(ctx, "crash_after")
        if crash is not None and ctx.attempt <= int(crash):
            raise StepFailed(f"{ctx.step} lost its reply after acting, attempt {ctx.attempt}")
        _wait_while(_rule(ctx, "block_while"))
        if (seconds := _rule(ctx, "sleep")) is not None:
            time.sleep(float(seconds))
        return result

    def _undo(self, ctx: StepContext) -> dict[str, Any]:
        _pause(ctx)
        marker = _rule(ctx, "comp_fail_while")
        if marker is not None and Path(marker).exists():
            raise StepFailed(f"{ctx.step}: compensation refused while {marker} exists")
        return self._effect(ctx)

    def _effect(self, ctx: StepContext) -> dict[str, Any]:
        def write(conn: sa.Connection) -> dict[str, Any]:
            conn.execute(
                effects.insert().values(
                    key=ctx.idempotency_key,
                    saga_id=ctx.saga_id,
                    step=ctx.step,
                    phase=str(ctx.phase),
                    attempt=ctx.attempt,
                    at_ns=time.time_ns(),
                )
            )
            return {"step": ctx.step, "phase": str(ctx.phase)}

        return self.guard.run_once(ctx.idempotency_key, write)

    def _record_start(self, ctx: StepContext) -> int:
        with self.db.begin() as conn:
            row = conn.execute(
                calls.insert().values(
                    key=ctx.idempotency_key,
                    saga_id=ctx.saga_id,
                    step=ctx.step,
                    phase=str(ctx.phase),
                    attempt=ctx.attempt,
                    pid=os.getpid(),
                    started_ns=time.time_ns(),
                )
            )
            key = row.inserted_primary_key
            assert key is not None
            return int(key[0])

    def _record_end(self, call_id: int, outcome: str) -> None:
        with self.db.begin() as conn:
            conn.execute(
                calls.update()
                .where(calls.c.id == call_id)
                .values(ended_ns=time.time_ns(), outcome=outcome)
            )

    # -- what tests read -------------------------------------------------------------

    def effects(self, saga_id: str | None = None) -> list[tuple[str, str]]:
        """(step, phase) of every effect, in the order they happened."""
        query = sa.select(effects.c.step, effects.c.phase).order_by(effects.c.id)
        if saga_id is not None:
            query = query.where(effects.c.saga_id == saga_id)
        with self.db.connect() as conn:
            return [(s, p) for s, p in conn.execute(query)]

    def effect_attempts(self, saga_id: str) -> list[tuple[str, str, int]]:
        """(step, phase, attempt) of every effect of one instance, in order."""
        query = (
            sa.select(effects.c.step, effects.c.phase, effects.c.attempt)
            .where(effects.c.saga_id == saga_id)
            .order_by(effects.c.id)
        )
        with self.db.connect() as conn:
            return [(s, p, int(a)) for s, p, a in conn.execute(query)]

    def effect_counts(self) -> dict[str, int]:
        """Effects per idempotency key."""
        query = sa.select(effects.c.key, sa.func.count()).group_by(effects.c.key)
        with self.db.connect() as conn:
            return {k: int(n) for k, n in conn.execute(query)}

    def calls(self, saga_id: str | None = None) -> list[Any]:
        query = sa.select(calls).order_by(calls.c.id)
        if saga_id is not None:
            query = query.where(calls.c.saga_id == saga_id)
        with self.db.connect() as conn:
            return list(conn.execute(query))

    def overlaps(self) -> list[tuple[str, Any, Any]]:
        """Pairs of calls of one key whose intervals overlap (an unfinished call never ends)."""
        by_key: dict[str, list[Any]] = {}
        for call in self.calls():
            by_key.setdefault(call.key, []).append(call)
        found = []
        for key, rows in by_key.items():
            rows.sort(key=lambda r: r.started_ns)
            for before, after in itertools.pairwise(rows):
                if before.ended_ns is None or after.started_ns < before.ended_ns:
                    found.append((key, before, after))
        return found


def _rule(ctx: StepContext, name: str) -> Any:
    rules = ctx.payload.get(name) if isinstance(ctx.payload, dict) else None
    return rules.get(ctx.step) if isinstance(rules, dict) else None


def _pause(ctx: StepContext) -> None:
    most = ctx.payload.get("pause_ms") if isinstance(ctx.payload, dict) else None
    if most:
        time.sleep(random.uniform(0, most) / 1000)


def _wait_while(marker: str | None, limit: float = 60.0) -> None:
    if marker is None:
        return
    give_up = time.monotonic() + limit
    while Path(marker).exists() and time.monotonic() < give_up:
        time.sleep(0.02)
