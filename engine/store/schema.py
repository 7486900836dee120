"""The store's tables, as SQLAlchemy Core metadata valid on PostgreSQL and SQLite.

Alembic migrations under ``engine/store/migrations`` create these; a test checks
that the migrated schema matches this metadata. Times are BIGINT epoch
milliseconds. Partial indexes keep the worker's hot queries off finished
instances.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Millis = sa.BigInteger

ACTIVE = "state IN ('running', 'compensating')"
#: Active or waiting for an operator: what the metrics count, never the finished bulk.
OPEN = "state IN ('running', 'compensating', 'failed')"
FINISHED = "state IN ('completed', 'compensated', 'cancelled')"

instances = sa.Table(
    "saga_instances",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("saga_name", sa.String(100), nullable=False),
    sa.Column("saga_version", sa.Integer, nullable=False),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("current_step", sa.Integer, nullable=False),
    sa.Column("step_count", sa.Integer, nullable=False),
    sa.Column("payload", JsonType, nullable=True),
    sa.Column("correlation_id", sa.String(200), nullable=False),
    sa.Column("business_key", sa.String(200), nullable=True),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("updated_at", Millis, nullable=False),
    sa.Column("last_progress_at", Millis, nullable=False),
    sa.Column("next_run_at", Millis, nullable=True),
    sa.Column("lease_owner", sa.String(200), nullable=True),
    sa.Column("lease_expires_at", Millis, nullable=True),
    # Set by the stuck sweep when the instance made no progress for longer than
    # its current step is expected to take (plus grace); cleared on progress.
    sa.Column("stuck_since", Millis, nullable=True),
    # 'orchestrated' (run by the engine) or 'choreographed' (tracked from domain events).
    sa.Column("kind", sa.String(20), nullable=False, server_default="orchestrated"),
    sa.Index(
        "ix_saga_instances_due",
        "next_run_at",
        postgresql_where=sa.text(ACTIVE),
        sqlite_where=sa.text(ACTIVE),
    ),
    sa.Index(
        "ix_saga_instances_leased",
        "lease_expires_at",
        postgresql_where=sa.text("lease_owner IS NOT NULL"),
        sqlite_where=sa.text("lease_owner IS NOT NULL"),
    ),
    sa.Index(
        "ix_saga_instances_stuck",
        "stuck_since",
        postgresql_where=sa.text("stuck_since IS NOT NULL"),
        sqlite_where=sa.text("stuck_since IS NOT NULL"),
    ),
    # The stuck sweep: active instances not yet flagged, by how long ago they progressed.
    sa.Index(
        "ix_saga_instances_progress",
        "last_progress_at",
        postgresql_where=sa.text(f"{ACTIVE} AND stuck_since IS NULL"),
        sqlite_where=sa.text(f"{ACTIVE} AND stuck_since IS NULL"),
    ),
    # Retention: finished instances, oldest first.
    sa.Index(
        "ix_saga_instances_finished",
        "updated_at",
        postgresql_where=sa.text(FINISHED),
        sqlite_where=sa.text(FINISHED),
    ),
    # The metrics' gauges: counts by saga and state, stuck included, from the index alone.
    sa.Index(
        "ix_saga_instances_open",
        "saga_name",
        "state",
        "stuck_since",
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    ),
    sa.Index("ix_saga_instances_created", "created_at", "id"),
    sa.Index("ix_saga_instances_state_created", "state", "created_at", "id"),
    # The console's saga-type filter: a tab's page and its count read one range.
    sa.Index("ix_saga_instances_name_state_created", "saga_name", "state", "created_at", "id"),
    sa.Index("ix_saga_instances_correlation", "correlation_id"),
    sa.Index("ix_saga_instances_business_key", "business_key"),
    sa.Index("uq_saga_instances_idempotency", "saga_name", "idempotency_key", unique=True),
)

steps = sa.Table(
    "saga_steps",
    metadata,
    sa.Column(
        "saga_id",
        sa.String(36),
        sa.ForeignKey("saga_instances.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("step_index", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("attempts_base", sa.Integer, nullable=False),
    sa.Column("started_at", Millis, nullable=True),
    sa.Column("finished_at", Millis, nullable=True),
    sa.Column("deadline_at", Millis, nullable=True),
    sa.Column("output", JsonType, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("comp_status", sa.String(20), nullable=False),
    sa.Column("comp_attempts", sa.Integer, nullable=False),
    sa.Column("comp_attempts_base", sa.Integer, nullable=False),
    sa.Column("comp_started_at", Millis, nullable=True),
    sa.Column("comp_finished_at", Millis, nullable=True),
    sa.Column("comp_deadline_at", Millis, nullable=True),
    sa.Column("comp_error", sa.Text, nullable=True),
)

events = sa.Table(
    "saga_events",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("saga_id", sa.String(36), nullable=False),
    sa.Column("correlation_id", sa.String(200), nullable=False),
    sa.Column("at", Millis, nullable=False),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("step_index", sa.Integer, nullable=True),
    sa.Column("step_name", sa.String(100), nullable=True),
    sa.Column("phase", sa.String(20), nullable=True),
    sa.Column("attempt", sa.Integer, nullable=True),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("traceback", sa.Text, nullable=True),
    sa.Column("detail", JsonType, nullable=True),
    sa.Index("ix_saga_events_saga", "saga_id", "id"),
    sa.Index("ix_saga_events_correlation", "correlation_id"),
)

dead_letters = sa.Table(
    "saga_dead_letters",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("saga_id", sa.String(36), nullable=False),
    sa.Column("saga_name", sa.String(100), nullable=False),
    sa.Column("step_index", sa.Integer, nullable=False),
    sa.Column("step_name", sa.String(100), nullable=False),
    sa.Column("phase", sa.String(20), nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("traceback", sa.Text, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("resolved_at", Millis, nullable=True),
    sa.Column("resolved_by", sa.String(200), nullable=True),
    sa.Column("resolution", sa.String(40), nullable=True),
    # Set by the dead-letter sweep: how many automatic retries the instance had before
    # this dead letter (NULL: not planned yet), and when the sweep retries it (NULL:
    # never: the saga has no dead_letter_retry policy, or its limit is reached).
    sa.Column("auto_retries", sa.Integer, nullable=True),
    sa.Column("auto_retry_at", Millis, nullable=True),
    sa.Index("ix_saga_dead_letters_saga", "saga_id"),
    sa.Index(
        "ix_saga_dead_letters_open",
        "created_at",
        postgresql_where=sa.text("resolved_at IS NULL"),
        sqlite_where=sa.text("resolved_at IS NULL"),
    ),
    # The metrics' depth and oldest age by saga, from the index alone.
    sa.Index(
        "ix_saga_dead_letters_open_saga",
        "saga_name",
        "created_at",
        postgresql_where=sa.text("resolved_at IS NULL"),
        sqlite_where=sa.text("resolved_at IS NULL"),
    ),
    sa.Index(
        "ix_saga_dead_letters_unplanned",
        "saga_name",
        "id",
        postgresql_where=sa.text("resolved_at IS NULL AND auto_retries IS NULL"),
        sqlite_where=sa.text("resolved_at IS NULL AND auto_retries IS NULL"),
    ),
    sa.Index(
        "ix_saga_dead_letters_auto_retry",
        "auto_retry_at",
        postgresql_where=sa.text("resolved_at IS NULL AND auto_retry_at IS NOT NULL"),
        sqlite_where=sa.text("resolved_at IS NULL AND auto_retry_at IS NOT NULL"),
    ),
)

operator_actions = sa.Table(
    "saga_operator_actions",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("at", Millis, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(40), nullable=False),
    sa.Column("saga_id", sa.String(36), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("state_before", sa.String(20), nullable=False),
    sa.Column("state_after", sa.String(20), nullable=False),
    sa.Column("version_before", sa.Integer, nullable=False),
    sa.Column("version_after", sa.Integer, nullable=False),
    sa.Column("step_name", sa.String(100), nullable=True),
    sa.Column("detail", JsonType, nullable=True),
    # Where the action came from, beside the actor it claims (engine/origins.py);
    # "unknown" for the entries written before the origin was kept.
    sa.Column("origin", sa.String(20), nullable=False, server_default="unknown"),
    sa.Column("origin_detail", sa.String(200), nullable=True),
    sa.Index("ix_saga_operator_actions_saga", "saga_id", "id"),
    sa.Index("ix_saga_operator_actions_at", "at"),
)

idempotency_keys = sa.Table(
    "saga_idempotency_keys",
    metadata,
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("scope", sa.String(100), nullable=False),
    sa.Column("result", JsonType, nullable=True),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("duplicates", sa.Integer, nullable=False, server_default="0"),
    # Set on an action's row written by its compensation before the action ran:
    # the action is refused if it arrives later (its step was undone already).
    sa.Column("fenced_at", Millis, nullable=True),
)

users = sa.Table(
    "saga_users",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(150), nullable=False),
    sa.Column("password_hash", sa.String(300), nullable=False),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("updated_at", Millis, nullable=False),
    sa.Column("created_by", sa.String(150), nullable=True),
    sa.Column("last_login_at", Millis, nullable=True),
    # Raised to end every session of the user at once (migration 0012).
    sa.Column("session_epoch", sa.Integer, nullable=False, server_default="0"),
    # An admin forced a reset: a new password before anything else (migration 0012).
    sa.Column("must_change_password", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("uq_saga_users_name", "name", unique=True),
)

# Instances the stuck sweep (or the choreography tracker) flagged (migration 0010),
# remembered apart from ``stuck_since`` because any save clears that: the next
# stuck pass finds the ones whose flag went, and notes it on their timeline.
stuck_marks = sa.Table(
    "saga_stuck_marks",
    metadata,
    sa.Column("saga_id", sa.String(36), primary_key=True),
    sa.Column("since", Millis, nullable=False),
)

# Changes to console users (migration 0009): who added, promoted, demoted,
# disabled or re-enabled whom, and when. Kept apart from the operator actions,
# which are about saga instances.
user_changes = sa.Table(
    "saga_user_changes",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("at", Millis, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(20), nullable=False),
    sa.Column("user_name", sa.String(150), nullable=False),
    sa.Column("detail", JsonType, nullable=True),
    sa.Index("ix_saga_user_changes_at", "at"),
)

# Failed console sign-ins (migration 0008), one row each, shared by every console
# process so that the limit holds however many gunicorn workers or hosts serve it.
login_failures = sa.Table(
    "saga_login_failures",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(400), nullable=False),
    sa.Column("at", Millis, nullable=False),
    sa.Index("ix_saga_login_failures_key_at", "key", "at"),
    sa.Index("ix_saga_login_failures_at", "at"),
)

# Bulk recovery (migration 0006): an operator's action over every instance a
# filter matched, and each instance's outcome. No foreign key to the
# instances: the report outlives a retention purge, like the audit log.
bulk_operations = sa.Table(
    "saga_bulk_operations",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("action", sa.String(20), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_by", sa.String(150), nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("selection", JsonType, nullable=False),
    sa.Column("batch_size", sa.Integer, nullable=False),
    sa.Column("rate_per_second", sa.Float, nullable=False),
    sa.Column("max_failure_rate", sa.Float, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("processed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("applied", sa.Integer, nullable=False, server_default="0"),
    sa.Column("skipped", sa.Integer, nullable=False, server_default="0"),
    sa.Column("errors", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed_again", sa.Integer, nullable=False, server_default="0"),
    sa.Column("runner", sa.String(200), nullable=True),
    sa.Column("heartbeat_at", Millis, nullable=True),
    sa.Column("started_at", Millis, nullable=True),
    sa.Column("finished_at", Millis, nullable=True),
    sa.Column("stop_requested_at", Millis, nullable=True),
    sa.Column("stop_requested_by", sa.String(150), nullable=True),
    sa.Column("note", sa.Text, nullable=True),
    # The origin of whoever created it: each item's audit entry is recorded with it.
    sa.Column("origin", sa.String(20), nullable=False, server_default="unknown"),
    sa.Column("origin_detail", sa.String(200), nullable=True),
    # Instances the filter matched when it was confirmed that the dry run had not shown:
    # left alone (the operation acts on what was previewed), offered for another run.
    sa.Column("more_matching", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_saga_bulk_operations_created", "created_at", "id"),
)

bulk_items = sa.Table(
    "saga_bulk_items",
    metadata,
    sa.Column(
        "operation_id",
        sa.String(36),
        sa.ForeignKey("saga_bulk_operations.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("saga_id", sa.String(36), nullable=False),
    sa.Column("saga_name", sa.String(100), nullable=False),
    sa.Column("state_before", sa.String(20), nullable=False),
    sa.Column("version_before", sa.Integer, nullable=False),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("state_after", sa.String(20), nullable=True),
    sa.Column("version_after", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("processed_at", Millis, nullable=True),
    # Followed after the action was accepted (engine/bulk/model.py says what each means):
    # when the instance took it (its stored time), what became of it, and when that was final.
    sa.Column("acted_at", Millis, nullable=True),
    sa.Column("result", sa.String(20), nullable=True),
    sa.Column("ended_at", Millis, nullable=True),
    sa.Index("ix_saga_bulk_items_outcome", "operation_id", "outcome", "seq"),
    # The items still followed: applied, and not ended yet; a follow pass reads only these.
    sa.Index(
        "ix_saga_bulk_items_open",
        "operation_id",
        "seq",
        postgresql_where=sa.text("outcome = 'applied' AND ended_at IS NULL"),
        sqlite_where=sa.text("outcome = 'applied' AND ended_at IS NULL"),
    ),
)

#: What a dry run previewed: the instances (ids and versions) a confirmation acts on.
bulk_snapshots = sa.Table(
    "saga_bulk_snapshots",
    metadata,
    sa.Column("token", sa.String(36), primary_key=True),
    sa.Column("action", sa.String(20), nullable=False),
    sa.Column("selection", JsonType, nullable=False),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("expires_at", Millis, nullable=False),
    sa.Index("ix_saga_bulk_snapshots_expires", "expires_at"),
)

bulk_snapshot_items = sa.Table(
    "saga_bulk_snapshot_items",
    metadata,
    sa.Column(
        "token",
        sa.String(36),
        sa.ForeignKey("saga_bulk_snapshots.token", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("saga_id", sa.String(36), nullable=False),
    sa.Column("saga_name", sa.String(100), nullable=False),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)

signals = sa.Table(
    "saga_signals",
    metadata,
    # One signal per event and instance: a wait step takes the one stored for its event.
    sa.Column(
        "saga_id",
        sa.String(36),
        sa.ForeignKey("saga_instances.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("event", sa.String(100), primary_key=True),
    sa.Column("data", JsonType, nullable=True),
    sa.Column("received_at", Millis, nullable=False),
    sa.Column("sent_by", sa.String(200), nullable=False),
)

# Choreography (migration 0007): domain events a handler kept failing on, or
# that could not be read, with the reason; the console lists them.
event_dead_letters = sa.Table(
    "saga_event_dead_letters",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("at", Millis, nullable=False),
    sa.Column("handler", sa.String(200), nullable=False),
    sa.Column("event_id", sa.String(200), nullable=True),
    sa.Column("event_type", sa.String(200), nullable=True),
    sa.Column("correlation_id", sa.String(200), nullable=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("fields", JsonType, nullable=True),
    sa.Index("ix_saga_event_dead_letters_at", "at"),
)
