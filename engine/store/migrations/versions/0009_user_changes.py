"""console user changes: saga_user_changes

Who added, promoted, demoted, disabled, re-enabled or reset the password of
which console user, and when, written in the transaction that made the change.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "saga_user_changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("user_name", sa.String(length=150), nullable=False),
        sa.Column("detail", _JSON, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_saga_user_changes_at", "saga_user_changes", ["at"])


def downgrade() -> None:
    op.drop_index("ix_saga_user_changes_at", table_name="saga_user_changes")
    op.drop_table("saga_user_changes")
