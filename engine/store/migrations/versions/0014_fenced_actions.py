"""fenced actions: saga_idempotency_keys.fenced_at

When a compensation runs before its step's action ever ran, the guard writes the
action's key row with ``fenced_at``; an action arriving later under that key is
refused instead of leaving an effect nothing undoes.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("saga_idempotency_keys") as batch:
        batch.add_column(sa.Column("fenced_at", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("saga_idempotency_keys") as batch:
        batch.drop_column("fenced_at")
