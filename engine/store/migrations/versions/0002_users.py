"""console users, and the index of the console's saga-type filter

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 19:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saga_users",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(length=150), nullable=False),
        sa.Column("password_hash", sa.String(length=300), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("disabled", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.String(length=150), nullable=True),
        sa.Column("last_login_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("saga_users", schema=None) as batch_op:
        batch_op.create_index("uq_saga_users_name", ["name"], unique=True)
    with op.batch_alter_table("saga_instances", schema=None) as batch_op:
        batch_op.create_index(
            "ix_saga_instances_name_state_created",
            ["saga_name", "state", "created_at", "id"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("saga_instances", schema=None) as batch_op:
        batch_op.drop_index("ix_saga_instances_name_state_created")
    with op.batch_alter_table("saga_users", schema=None) as batch_op:
        batch_op.drop_index("uq_saga_users_name")
    op.drop_table("saga_users")
