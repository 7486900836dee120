"""Settings, read once from the environment.

Every setting is a ``SAGA_*`` variable; the README's settings table lists
them all. Unset means the embedded default: SQLite in the working directory
and the in-process queue.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InvalidInput
from engine.inputs import MAX_INT32, parse_int


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Settings:
    """The engine's settings; build with :meth:`from_env` or directly in tests."""

    #: SQLAlchemy URL of the store (``sqlite:///saga.db`` or ``postgresql://...``).
    database_url: str = "sqlite:///saga.db"
    #: Redis URL for the queue; None means the in-process queue.
    redis_url: str | None = None
    #: Prefix of every Redis key (``<prefix>:work``, ``<prefix>:poison``); give two
    #: deployments that share one Redis different prefixes.
    redis_prefix: str = "saga"
    #: Approximate cap on the work stream's length (XADD MAXLEN ~): older doorbells are
    #: trimmed, even unread ones, and the workers' store poll finds their work instead.
    redis_stream_maxlen: int = 100_000
    #: A doorbell delivered to a worker and not acknowledged for this long (the worker
    #: died) is taken over by a live worker (XAUTOCLAIM).
    redis_claim_idle_seconds: float = 30.0
    #: An entry taken over (XAUTOCLAIM) after this many deliveries, none acknowledged
    #: (every reader that took it died or hung), is set aside on ``<prefix>:poison``.
    redis_max_deliveries: int = 10
    #: Modules that define sagas, comma-separated (like ``-A``).
    app: tuple[str, ...] = ()
    #: How long a worker's lease on an instance lasts without a heartbeat.
    lease_seconds: float = 30.0
    #: How often a worker looks in the store for due work (retries, lost messages).
    poll_seconds: float = 0.5
    #: Instances a worker advances at the same time.
    concurrency: int = 8
    #: Name of this process in leases and on the timeline.
    worker_id: str = field(default_factory=_default_worker_id)
    #: ``text`` or ``json`` log lines.
    log_format: str = "text"
    log_level: str = "INFO"
    #: Bearer token the Prometheus endpoint asks for, when set.
    metrics_token: str | None = None
    #: How often the sweeper looks for overdue deadlines, expired leases and due work
    #: whose doorbell was lost.
    sweep_dispatch_seconds: float = 5.0
    #: How often the sweeper looks for instances that stopped progressing (stuck).
    sweep_stuck_seconds: float = 30.0
    #: How often the sweeper plans and runs automatic dead-letter retries.
    sweep_dead_letter_seconds: float = 30.0
    #: How often the sweeper purges finished instances past the retention period.
    sweep_retention_seconds: float = 60.0
    #: Rows one sweep handles per pass at most (retention: per batch, for 0.1 s a pass).
    sweep_batch: int = 200
    #: Due work that no worker claimed for this long gets its doorbell rung again.
    sweep_redispatch_seconds: float = 10.0
    #: Finished instances (completed, compensated, cancelled) last changed more than
    #: this many days ago are purged with their steps, events and dead letters; the
    #: audit log is kept. Unset: kept forever.
    retention_days: float | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        get = env.get
        return cls(
            database_url=get("SAGA_DATABASE_URL") or cls.database_url,
            redis_url=get("SAGA_REDIS_URL") or None,
            redis_prefix=get("SAGA_REDIS_PREFIX") or cls.redis_prefix,
            redis_stream_maxlen=_whole(env, "SAGA_REDIS_STREAM_MAXLEN", cls.redis_stream_maxlen),
            redis_claim_idle_seconds=_number(
                env, "SAGA_REDIS_CLAIM_IDLE_SECONDS", cls.redis_claim_idle_seconds
            ),
            redis_max_deliveries=_whole(env, "SAGA_REDIS_MAX_DELIVERIES", cls.redis_max_deliveries),
            app=tuple(m.strip() for m in (get("SAGA_APP") or "").split(",") if m.strip()),
            lease_seconds=_number(env, "SAGA_LEASE_SECONDS", cls.lease_seconds),
            poll_seconds=_number(env, "SAGA_POLL_SECONDS", cls.poll_seconds),
            concurrency=_whole(env, "SAGA_CONCURRENCY", cls.concurrency),
            worker_id=get("SAGA_WORKER_ID") or _default_worker_id(),
            log_format=_choice(env, "SAGA_LOG_FORMAT", ("text", "json"), cls.log_format),
            log_level=(get("SAGA_LOG_LEVEL") or cls.log_level).upper(),
            metrics_token=get("SAGA_METRICS_TOKEN") or None,
            **_sweep_settings(env),
        )


def _sweep_settings(env: Mapping[str, str]) -> dict[str, Any]:
    d = Settings
    retention = env.get("SAGA_RETENTION_DAYS")
    return {
        "sweep_dispatch_seconds": _number(
            env, "SAGA_SWEEP_DISPATCH_SECONDS", d.sweep_dispatch_seconds
        ),
        "sweep_stuck_seconds": _number(env, "SAGA_SWEEP_STUCK_SECONDS", d.sweep_stuck_seconds),
        "sweep_dead_letter_seconds": _number(
            env, "SAGA_SWEEP_DEAD_LETTER_SECONDS", d.sweep_dead_letter_seconds
        ),
        "sweep_retention_seconds": _number(
            env, "SAGA_SWEEP_RETENTION_SECONDS", d.sweep_retention_seconds
        ),
        "sweep_batch": _whole(env, "SAGA_SWEEP_BATCH", d.sweep_batch),
        "sweep_redispatch_seconds": _number(
            env, "SAGA_SWEEP_REDISPATCH_SECONDS", d.sweep_redispatch_seconds
        ),
        "retention_days": _number(env, "SAGA_RETENTION_DAYS", 0) if retention else None,
    }


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(name, f"expected a number, got {raw!r}") from None
    if value <= 0:
        raise InvalidInput(name, f"must be positive, got {raw!r}")
    return value


def _whole(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    return parse_int(name, raw, low=1, high=MAX_INT32)


def _choice(env: Mapping[str, str], name: str, options: tuple[str, ...], default: str) -> str:
    raw = (env.get(name) or default).lower()
    if raw not in options:
        raise InvalidInput(name, f"expected one of {', '.join(options)}, got {raw!r}")
    return raw
