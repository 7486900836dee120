"""choreography (issue 6): saga_instances.kind, and dead-lettered domain events

``kind`` tells the instances the engine runs ('orchestrated') from those the
choreography tracker keeps from domain events ('choreographed').
``saga_event_dead_letters`` keeps the domain events a handler kept failing
on, or that could not be read at all, with the reason, for the console.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("saga_instances") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(length=20), server_default="orchestrated", nullable=False)
        )
    op.create_table(
        "saga_event_dead_letters",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("handler", sa.String(length=200), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=True),
        sa.Column("event_type", sa.String(length=200), nullable=True),
        sa.Column("correlation_id", sa.String(length=200), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("fields", _JSON, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("saga_event_dead_letters") as batch:
        batch.create_index("ix_saga_event_dead_letters_at", ["at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("saga_event_dead_letters") as batch:
        batch.drop_index("ix_saga_event_dead_letters_at")
    op.drop_table("saga_event_dead_letters")
    with op.batch_alter_table("saga_instances") as batch:
        batch.drop_column("kind")
