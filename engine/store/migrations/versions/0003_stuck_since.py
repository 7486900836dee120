"""saga_instances.stuck_since: when the stuck sweep flagged an instance

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("saga_instances") as batch:
        batch.add_column(sa.Column("stuck_since", sa.BigInteger(), nullable=True))
        batch.create_index(
            "ix_saga_instances_stuck",
            ["stuck_since"],
            postgresql_where=sa.text("stuck_since IS NOT NULL"),
            sqlite_where=sa.text("stuck_since IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("saga_instances") as batch:
        batch.drop_index("ix_saga_instances_stuck")
        batch.drop_column("stuck_since")
