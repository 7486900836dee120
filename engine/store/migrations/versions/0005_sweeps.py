"""sweeps, stuck policies and dead-letter auto-retry (issue 5)

Indexes that keep every sweep and every metrics scrape on a small slice of
the store (partial indexes, valid on PostgreSQL and SQLite), and the two
dead-letter columns the automatic retry needs. On PostgreSQL, CREATE INDEX
blocks writes to the table while it builds; on a large store, run the
upgrade in a quiet moment.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ACTIVE = "state IN ('running', 'compensating')"
OPEN = "state IN ('running', 'compensating', 'failed')"
FINISHED = "state IN ('completed', 'compensated', 'cancelled')"

#: name, table, columns, partial-index predicate
INDEXES = (
    (
        "ix_saga_instances_progress",
        "saga_instances",
        ["last_progress_at"],
        f"{ACTIVE} AND stuck_since IS NULL",
    ),
    ("ix_saga_instances_finished", "saga_instances", ["updated_at"], FINISHED),
    ("ix_saga_instances_open", "saga_instances", ["saga_name", "state", "stuck_since"], OPEN),
    (
        "ix_saga_dead_letters_open_saga",
        "saga_dead_letters",
        ["saga_name", "created_at"],
        "resolved_at IS NULL",
    ),
    (
        "ix_saga_dead_letters_unplanned",
        "saga_dead_letters",
        ["saga_name", "id"],
        "resolved_at IS NULL AND auto_retries IS NULL",
    ),
    (
        "ix_saga_dead_letters_auto_retry",
        "saga_dead_letters",
        ["auto_retry_at"],
        "resolved_at IS NULL AND auto_retry_at IS NOT NULL",
    ),
)


def upgrade() -> None:
    # Plain ADD COLUMN of nullable columns: no table rewrite on either backend.
    op.add_column("saga_dead_letters", sa.Column("auto_retries", sa.Integer(), nullable=True))
    op.add_column("saga_dead_letters", sa.Column("auto_retry_at", sa.BigInteger(), nullable=True))
    for name, table, columns, where in INDEXES:
        op.create_index(
            name,
            table,
            columns,
            postgresql_where=sa.text(where),
            sqlite_where=sa.text(where),
        )


def downgrade() -> None:
    for name, table, _columns, _where in reversed(INDEXES):
        op.drop_index(name, table_name=table)
    with op.batch_alter_table("saga_dead_letters") as batch:
        batch.drop_column("auto_retry_at")
        batch.drop_column("auto_retries")
