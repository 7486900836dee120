"""console user sessions: saga_users.session_epoch and must_change_password

``session_epoch`` is written into every console session a user signs in with;
raising it (sign-out, a password change, disabling the user, a forced reset)
ends every session that carries the old value, in every console process.
``must_change_password`` is set by an admin's forced reset: the user signs in
with the old password and must choose a new one before anything else.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("saga_users") as batch:
        batch.add_column(
            sa.Column("session_epoch", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column(
                "must_change_password", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("saga_users") as batch:
        batch.drop_column("must_change_password")
        batch.drop_column("session_epoch")
