"""action origins: saga_operator_actions.origin, saga_bulk_operations.origin

Where an operator action came from (cli, console, api, sweeper, engine) and
who or what behind it, beside the actor it claims; a bulk operation keeps its
creator's, for the entries of its items. Rows written before this migration
did not record it: they read ``unknown``.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_TABLES = ("saga_operator_actions", "saga_bulk_operations")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("origin", sa.String(length=20), server_default="unknown", nullable=False)
            )
            batch.add_column(sa.Column("origin_detail", sa.String(length=200), nullable=True))


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("origin_detail")
            batch.drop_column("origin")
