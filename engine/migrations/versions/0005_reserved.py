"""sweeps, stuck policies and dead-letter auto-retry (issue 5)

Reserved so that work on separate issues chains its migrations without
conflicts; it changes nothing until that work fills it in.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
