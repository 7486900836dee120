"""bulk outcomes followed to their end, and dry-run snapshots (issue 12)

Each applied item of a bulk operation is followed until its instance ends:
``acted_at``, ``result`` and ``ended_at`` on ``saga_bulk_items``, with a
partial index on the items still followed. A dry run keeps the instances it
previewed (ids and versions) in ``saga_bulk_snapshots`` and
``saga_bulk_snapshot_items``, so the confirmation acts on exactly those;
``more_matching`` counts the instances that matched at confirmation on top.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
_OPEN = "outcome = 'applied' AND ended_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("saga_bulk_items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("acted_at", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("result", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("ended_at", sa.BigInteger(), nullable=True))
        batch_op.create_index(
            "ix_saga_bulk_items_open",
            ["operation_id", "seq"],
            unique=False,
            postgresql_where=sa.text(_OPEN),
            sqlite_where=sa.text(_OPEN),
        )
    with op.batch_alter_table("saga_bulk_operations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("more_matching", sa.Integer(), server_default="0", nullable=False)
        )
    op.create_table(
        "saga_bulk_snapshots",
        sa.Column("token", sa.String(length=36), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("selection", _JSON, nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("token"),
    )
    with op.batch_alter_table("saga_bulk_snapshots", schema=None) as batch_op:
        batch_op.create_index("ix_saga_bulk_snapshots_expires", ["expires_at"], unique=False)
    op.create_table(
        "saga_bulk_snapshot_items",
        sa.Column("token", sa.String(length=36), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("saga_id", sa.String(length=36), nullable=False),
        sa.Column("saga_name", sa.String(length=100), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["token"], ["saga_bulk_snapshots.token"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("token", "seq"),
    )


def downgrade() -> None:
    op.drop_table("saga_bulk_snapshot_items")
    with op.batch_alter_table("saga_bulk_snapshots", schema=None) as batch_op:
        batch_op.drop_index("ix_saga_bulk_snapshots_expires")
    op.drop_table("saga_bulk_snapshots")
    with op.batch_alter_table("saga_bulk_operations", schema=None) as batch_op:
        batch_op.drop_column("more_matching")
    with op.batch_alter_table("saga_bulk_items", schema=None) as batch_op:
        batch_op.drop_index("ix_saga_bulk_items_open")
        batch_op.drop_column("ended_at")
        batch_op.drop_column("result")
        batch_op.drop_column("acted_at")
