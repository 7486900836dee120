"""remote participants, replies and signals (issue 3)

Reserved so that work on separate issues chains its migrations without
conflicts; it changes nothing until that work fills it in.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
