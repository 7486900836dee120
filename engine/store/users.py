"""Console users in the store: ``saga_users``, ``saga_user_changes`` (who changed whom)
and ``saga_login_failures`` (the sign-in throttle's memory).

:class:`~engine.users.UserStore` holds the rules (names, passwords, roles, the
last admin); :class:`UserRows` runs its statements, on a connection of a
transaction it opened when several belong together.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, RowMapping
from sqlalchemy.engine import Engine

from engine.store import schema as t

#: A row, by column name.
Row = RowMapping


class UserRows:
    """The statements of the user tables, on ``db``."""

    def __init__(self, db: Engine) -> None:
        self.db = db

    def transaction(self) -> AbstractContextManager[Connection]:
        """One transaction; commits on success, rolls back on error."""
        return self.db.begin()

    def connection(self) -> AbstractContextManager[Connection]:
        """A connection for reads."""
        return self.db.connect()

    # -- users ----------------------------------------------------------------------

    def by_name(self, c: Connection, name: str) -> Row | None:
        return c.execute(sa.select(t.users).where(t.users.c.name == name)).mappings().first()

    def by_id(self, c: Connection, user_id: int) -> Row | None:
        return c.execute(sa.select(t.users).where(t.users.c.id == user_id)).mappings().first()

    def all(self, c: Connection) -> list[Row]:
        """Every user, by name."""
        return list(c.execute(sa.select(t.users).order_by(t.users.c.name)).mappings())

    def count(self, c: Connection) -> int:
        return int(c.execute(sa.select(sa.func.count()).select_from(t.users)).scalar_one())

    def count_enabled(self, c: Connection, role: str) -> int:
        """Enabled users with ``role``."""
        u = t.users.c
        query = sa.select(sa.func.count()).where(u.role == role, u.disabled.is_(False))
        return int(c.execute(query).scalar_one())

    def insert(self, c: Connection, **values: Any) -> None:
        c.execute(t.users.insert().values(**values))

    def update(self, c: Connection, user_id: int, **values: Any) -> None:
        c.execute(t.users.update().where(t.users.c.id == user_id).values(**values))

    def raise_session_epoch(self, c: Connection, user_id: int) -> None:
        """Add one to the user's session epoch, in SQL: two raises at once both count."""
        u = t.users.c
        c.execute(t.users.update().where(u.id == user_id).values(session_epoch=u.session_epoch + 1))

    # -- changes ----------------------------------------------------------------------

    def record_change(
        self,
        c: Connection,
        at: int,
        actor: str,
        action: str,
        user: str,
        detail: dict[str, Any] | None,
    ) -> None:
        """Append a change to the users' history."""
        c.execute(
            t.user_changes.insert().values(
                at=at, actor=actor, action=action, user_name=user, detail=detail
            )
        )

    def recent_changes(self, c: Connection, limit: int) -> list[Row]:
        """The newest ``limit`` changes, newest first."""
        u = t.user_changes.c
        query = sa.select(t.user_changes).order_by(u.at.desc(), u.id.desc()).limit(limit)
        return list(c.execute(query).mappings())

    # -- failed sign-ins ----------------------------------------------------------------

    def recent_login_failures(self, key: str, since: int, limit: int) -> list[int]:
        """When ``key`` last failed to sign in, at or after ``since``: up to ``limit``
        times, newest first."""
        f = t.login_failures.c
        query = (
            sa.select(f.at).where(f.key == key, f.at >= since).order_by(f.at.desc()).limit(limit)
        )
        with self.db.connect() as c:
            return list(c.execute(query).scalars())

    def record_login_failure(self, key: str, at: int, forget_before: int) -> None:
        """Note a failed sign-in, and forget every failure older than ``forget_before``."""
        f = t.login_failures.c
        with self.db.begin() as c:
            c.execute(t.login_failures.insert().values(key=key, at=at))
            c.execute(t.login_failures.delete().where(f.at < forget_before))

    def clear_login_failures(self, key: str) -> None:
        with self.db.begin() as c:
            c.execute(t.login_failures.delete().where(t.login_failures.c.key == key))
