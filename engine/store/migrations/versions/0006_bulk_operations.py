"""bulk recovery operations and the outcome of each of their items (issue 5)

An operation is one operator's "apply this action to every instance this
filter matches"; its items are the instances matched when it was confirmed,
each with its outcome. The console's report page and ``saga bulk show``
read them; they outlive the instances (no foreign key to them), so the
report survives a retention purge.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _counter(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.Integer(), server_default="0", nullable=False)


def upgrade() -> None:
    op.create_table(
        "saga_bulk_operations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=150), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("selection", _JSON, nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("rate_per_second", sa.Float(), nullable=False),
        sa.Column("max_failure_rate", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        _counter("processed"),
        _counter("applied"),
        _counter("skipped"),
        _counter("errors"),
        _counter("failed_again"),
        sa.Column("runner", sa.String(length=200), nullable=True),
        sa.Column("heartbeat_at", sa.BigInteger(), nullable=True),
        sa.Column("started_at", sa.BigInteger(), nullable=True),
        sa.Column("finished_at", sa.BigInteger(), nullable=True),
        sa.Column("stop_requested_at", sa.BigInteger(), nullable=True),
        sa.Column("stop_requested_by", sa.String(length=150), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("saga_bulk_operations", schema=None) as batch_op:
        batch_op.create_index("ix_saga_bulk_operations_created", ["created_at", "id"], unique=False)
    op.create_table(
        "saga_bulk_items",
        sa.Column("operation_id", sa.String(length=36), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("saga_id", sa.String(length=36), nullable=False),
        sa.Column("saga_name", sa.String(length=100), nullable=False),
        sa.Column("state_before", sa.String(length=20), nullable=False),
        sa.Column("version_before", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("state_after", sa.String(length=20), nullable=True),
        sa.Column("version_after", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("processed_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["operation_id"], ["saga_bulk_operations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("operation_id", "seq"),
    )
    with op.batch_alter_table("saga_bulk_items", schema=None) as batch_op:
        batch_op.create_index(
            "ix_saga_bulk_items_outcome", ["operation_id", "outcome", "seq"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("saga_bulk_items", schema=None) as batch_op:
        batch_op.drop_index("ix_saga_bulk_items_outcome")
    op.drop_table("saga_bulk_items")
    with op.batch_alter_table("saga_bulk_operations", schema=None) as batch_op:
        batch_op.drop_index("ix_saga_bulk_operations_created")
    op.drop_table("saga_bulk_operations")
