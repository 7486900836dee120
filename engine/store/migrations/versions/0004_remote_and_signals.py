"""saga_signals: external events delivered to instances (remote participants need no table)

A signal is stored before anything else happens to it, so a worker finds it
whether it arrived while its step waited or before the step began. Remote
participants' commands and replies live on Redis streams (or the in-process
bus) and change instances through the usual version-checked save; they add
no table.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saga_signals",
        sa.Column(
            "saga_id",
            sa.String(36),
            sa.ForeignKey("saga_instances.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("event", sa.String(100), primary_key=True),
        sa.Column("data", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True),
        sa.Column("received_at", sa.BigInteger(), nullable=False),
        sa.Column("sent_by", sa.String(200), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("saga_signals")
