"""shared login throttle: saga_login_failures

One row per failed console sign-in (``key`` is the name and client address),
so that every console process counts the same failures. Rows older than the
throttle's window are deleted as new failures come in.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saga_login_failures",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("key", sa.String(length=400), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_saga_login_failures_key_at", "saga_login_failures", ["key", "at"])
    op.create_index("ix_saga_login_failures_at", "saga_login_failures", ["at"])


def downgrade() -> None:
    op.drop_index("ix_saga_login_failures_at", table_name="saga_login_failures")
    op.drop_index("ix_saga_login_failures_key_at", table_name="saga_login_failures")
    op.drop_table("saga_login_failures")
