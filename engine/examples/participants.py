"""Pretend downstream services for the example sagas, and the faults a payload can ask for.

Each :class:`Participant` keeps its own records in its own table (created with
``CREATE TABLE IF NOT EXISTS`` on the database it is bound to, normally the
engine's store) and puts every effect behind the engine's
:class:`~engine.IdempotencyGuard`, keyed by ``ctx.idempotency_key``. So an
effect happens once per key even when the engine runs a step twice, and a
test can count effects by counting rows.

A compensation finds what to undo by the *action's* idempotency key
(``f"{ctx.saga_id}:{ctx.step}:action"``), not by the output it is given: the
output is None when the action's outcome is unknown (it timed out).

Faults
------
A saga's payload may ask a participant to misbehave, so tests and the demo
choose outcomes deterministically::

    {"fail": {"car": "permanent"}, "fail_compensation": {"flight": "flaky:2"}}

``fail`` applies to actions and ``fail_compensation`` to compensations,
keyed by the participant's short name. The rules:

``permanent``
    refuse with :class:`~engine.NonRetryableError`: no further attempts.
    (A compensation is retried all the same: it must eventually happen.)
``always``
    fail every attempt with a retryable error, until retries run out.
``flaky:N``
    fail attempts 1 to N, then succeed (``flaky`` alone means ``flaky:1``).
    Attempt numbers keep counting after an operator retry.
``timeout`` / ``timeout:N``
    do the effect, then hang past the step's timeout (every attempt, or the
    first N), as if the reply was lost: the outcome is unknown to the engine.
``slow:N``
    take N seconds before the effect, on the first attempt: slower than the
    step is expected to take (so the sweeper flags the saga stuck) but within
    its timeout, so the step then completes by itself.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.schema import CreateIndex, CreateTable

from engine import IdempotencyGuard, NonRetryableError, StepContext, StepFailed
from engine.logs import bound
from engine.model import now_ms
from engine.states import Phase

log = logging.getLogger(__name__)

#: How long a ``timeout`` fault hangs; the example steps time out well before.
HANG_SECONDS = 3.0

ACTIVE = "active"


class Participant:
    """A downstream service with a table of records, each made or undone once per key."""

    def __init__(self, name: str, table: str, undone_status: str = "cancelled") -> None:
        self.name = name
        self.undone_status = undone_status
        self.table = sa.Table(
            table,
            sa.MetaData(),
            sa.Column("key", sa.String(300), primary_key=True),  # the action's idempotency key
            sa.Column("saga_id", sa.String(36), nullable=False),
            sa.Column("correlation_id", sa.String(200), nullable=False),
            sa.Column("details", sa.JSON, nullable=True),
            sa.Column("status", sa.String(20), nullable=False),
            sa.Column("created_at", sa.BigInteger, nullable=False),
            sa.Column("undone_at", sa.BigInteger, nullable=True),
            sa.Index(f"ix_{table}_saga", "saga_id"),
        )
        self._db: SAEngine | None = None
        self._guard: IdempotencyGuard | None = None

    def bind(self, db: SAEngine) -> None:
        """Use ``db`` (normally ``engine.store.db``), creating the table if it is missing."""
        with db.begin() as conn:
            conn.execute(CreateTable(self.table, if_not_exists=True))
            for index in self.table.indexes:
                conn.execute(CreateIndex(index, if_not_exists=True))
        self._db = db
        self._guard = IdempotencyGuard(db, scope=self.name)

    def act(self, ctx: StepContext, details: dict[str, Any]) -> dict[str, Any]:
        """Make the record for this step, once per ``ctx.idempotency_key``; returns it."""
        with bound(ctx.saga_id, ctx.correlation_id):
            rule = fault(ctx, self.name)
            refuse(self.name, rule, ctx.attempt)
            dawdle_if_asked(self.name, rule, ctx.attempt)
            result = self.guard.run_once(
                ctx.idempotency_key, lambda c: self._insert(c, ctx, details)
            )
            log.debug("%s: recorded %s", self.name, ctx.idempotency_key)
            hang_if_asked(self.name, rule, ctx.attempt)
            return result

    def undo(self, ctx: StepContext) -> bool:
        """Undo the record the action made, once per ``ctx.idempotency_key``; False if none."""
        with bound(ctx.saga_id, ctx.correlation_id):
            rule = fault(ctx, self.name)
            refuse(self.name, rule, ctx.attempt)
            action_key = f"{ctx.saga_id}:{ctx.step}:{Phase.ACTION}"
            undone = self.guard.run_once(ctx.idempotency_key, lambda c: self._mark(c, action_key))
            log.debug("%s: undo of %s: %s", self.name, action_key, undone)
            hang_if_asked(self.name, rule, ctx.attempt)
            return bool(undone)

    def records(self, saga_id: str | None = None) -> list[dict[str, Any]]:
        """The participant's rows (of one saga, if given), oldest first."""
        query = sa.select(self.table).order_by(self.table.c.created_at, self.table.c.key)
        if saga_id is not None:
            query = query.where(self.table.c.saga_id == saga_id)
        with self.db.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    @property
    def db(self) -> SAEngine:
        if self._db is None:
            raise RuntimeError(
                f"participant {self.name!r} is not bound to a database; call "
                "init_engine(engine) from its example module first"
            )
        return self._db

    @property
    def guard(self) -> IdempotencyGuard:
        if self._guard is None:
            raise RuntimeError(f"participant {self.name!r} is not bound to a database")
        return self._guard

    def _insert(
        self, conn: Connection, ctx: StepContext, details: dict[str, Any]
    ) -> dict[str, Any]:
        conn.execute(
            self.table.insert().values(
                key=ctx.idempotency_key,
                saga_id=ctx.saga_id,
                correlation_id=ctx.correlation_id,
                details=details,
                status=ACTIVE,
                created_at=now_ms(),
            )
        )
        return {"id": ctx.idempotency_key, **details}

    def _mark(self, conn: Connection, action_key: str) -> bool:
        c = self.table.c
        changed = conn.execute(
            self.table.update()
            .where(c.key == action_key, c.status == ACTIVE)
            .values(status=self.undone_status, undone_at=now_ms())
        ).rowcount
        return bool(changed)


def fault(ctx: StepContext, participant: str) -> str | None:
    """The fault the payload asks ``participant`` to show in this phase, if any."""
    payload = ctx.payload if isinstance(ctx.payload, dict) else {}
    section = "fail" if ctx.phase is Phase.ACTION else "fail_compensation"
    rules = payload.get(section) or {}
    rule = rules.get(participant) if isinstance(rules, dict) else None
    return str(rule) if rule is not None else None


def refuse(participant: str, rule: str | None, attempt: int) -> None:
    """Raise the failure ``rule`` asks for on this attempt; ``timeout`` is not a refusal."""
    if rule is None:
        return
    kind, count = _parse(participant, rule)
    if kind == "permanent":
        raise NonRetryableError(f"{participant}: refused for good (fault {rule!r})")
    if kind == "always" or (kind == "flaky" and attempt <= count):
        raise StepFailed(
            f"{participant}: temporarily unavailable (fault {rule!r}, attempt {attempt})"
        )


def hang_if_asked(participant: str, rule: str | None, attempt: int) -> None:
    """After the effect, hang past the step's timeout when ``rule`` is a ``timeout`` fault."""
    if rule is None:
        return
    kind, count = _parse(participant, rule)
    if kind == "timeout" and (count == 0 or attempt <= count):
        log.debug("%s: hanging for %.1fs (fault %r)", participant, HANG_SECONDS, rule)
        time.sleep(HANG_SECONDS)


def dawdle_if_asked(participant: str, rule: str | None, attempt: int) -> None:
    """Before the effect, take the seconds a ``slow:N`` fault asks for (first attempt only)."""
    if rule is None:
        return
    kind, seconds = _parse(participant, rule)
    if kind == "slow" and attempt == 1:
        log.debug("%s: taking %ds (fault %r)", participant, seconds, rule)
        time.sleep(seconds)


def _parse(participant: str, rule: str) -> tuple[str, int]:
    kind, _, raw = rule.partition(":")
    if kind not in ("permanent", "always", "flaky", "timeout", "slow"):
        raise NonRetryableError(f"{participant}: unknown fault {rule!r}")
    if not raw:
        return kind, 1 if kind == "flaky" else 0
    if not raw.isdigit():
        raise NonRetryableError(f"{participant}: fault {rule!r} needs a whole number after ':'")
    return kind, int(raw)
