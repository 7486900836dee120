"""stuck marks: saga_stuck_marks

The instances flagged stuck, remembered apart from ``saga_instances.stuck_since``
(which any stored change clears), so the stuck sweep can note on the timeline
when a flag was lifted.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saga_stuck_marks",
        sa.Column("saga_id", sa.String(length=36), nullable=False),
        sa.Column("since", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("saga_id"),
    )
    # Instances flagged before this migration get their mark too.
    op.execute(
        "INSERT INTO saga_stuck_marks (saga_id, since) "
        "SELECT id, stuck_since FROM saga_instances WHERE stuck_since IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_table("saga_stuck_marks")
