"""A module for ``saga -A tests.helpers.approval_app ...``: the approval saga at module level."""

from __future__ import annotations

from tests.helpers.remote import approval

approval_saga = approval()
