"""Console users: names, hashed passwords and roles, kept in the store.

The console signs people in against this table; ``saga user add`` fills it.
Passwords are stored only as werkzeug hashes (scrypt). There is no default
user: only ``saga demo`` creates one, with a generated password it prints once.
Every change (added, role, disabled, enabled, password, forced reset) is
recorded in ``saga_user_changes`` with who made it, in the same transaction.

Sessions are revocable: each user row keeps a ``session_epoch`` that the
console writes into every session it signs the user in with, and checks on
every request. Signing out, a password change, a forced reset and disabling
the user raise it, which ends every session of that user at once, in every
console process, because the number lives in the store.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from werkzeug.security import check_password_hash, generate_password_hash

from engine.display import visible
from engine.errors import InvalidInput, UnknownUser
from engine.inputs import MAX_KEY, check_text, problem_in_text
from engine.model import now_ms
from engine.store.connection import Connection, Database
from engine.store.users import Row, UserRows

#: werkzeug's hash method for new passwords; a stored hash names its own method.
PASSWORD_HASH_METHOD = "scrypt"
MIN_PASSWORD = 8
MAX_PASSWORD = 200
_NAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,149}$")
# Checked against when the name is unknown, so a miss costs what a hit costs
# and response times do not reveal which names exist.
_DUMMY_HASH = generate_password_hash("not a password of anyone")


class Role(StrEnum):
    """What a console user may do; each role includes the ones before it."""

    VIEWER = "viewer"  # reads everything
    OPERATOR = "operator"  # also retries, skips, compensates and cancels sagas
    ADMIN = "admin"  # also manages users

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, needed: Role) -> bool:
        """True when this role may do what ``needed`` may do."""
        return self.rank >= needed.rank


@dataclass(frozen=True)
class User:
    """A console user, without the password hash."""

    id: int
    name: str
    role: Role
    disabled: bool
    created_at: int
    updated_at: int
    created_by: str | None
    last_login_at: int | None
    #: Sessions signed in with another epoch are over (see the module's docstring).
    session_epoch: int = 0
    #: An admin forced a reset: the user must choose a new password before anything else.
    must_change_password: bool = False

    @property
    def active(self) -> bool:
        return not self.disabled


@dataclass(frozen=True)
class UserChange:
    """One change to a console user, as recorded."""

    at: int
    actor: str
    action: str  # add, set_role, disable, enable, set_password, force_reset
    user_name: str
    detail: dict[str, Any] | None


class UserStore:
    """Console users and their rules, over the ``saga_users`` table (:mod:`engine.store.users`)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._rows = UserRows(db)

    def add(
        self, name: str, password: str, role: Role | str, *, created_by: str | None = None
    ) -> User:
        """Create a user; raises InvalidInput for a bad name, role or password, or a taken name."""
        name, role = normalise_name(name), parse_role(role)
        _check_password(password)
        now = now_ms()
        with self._rows.transaction() as c:
            if self._rows.by_name(c, name) is not None:
                raise InvalidInput("user name", f"{name!r} is taken")
            self._rows.insert(
                c,
                name=name,
                password_hash=generate_password_hash(password, method=PASSWORD_HASH_METHOD),
                role=str(role),
                disabled=False,
                created_at=now,
                updated_at=now,
                created_by=created_by,
            )
            self._record(c, now, created_by or "api", "add", name, {"role": str(role)})
            return _user(self._rows.by_name(c, name))

    def get(self, user_id: int) -> User | None:
        with self._rows.connection() as c:
            row = self._rows.by_id(c, user_id)
        return _user(row) if row is not None else None

    def by_name(self, name: str) -> User | None:
        """The user called ``name``; None for any other text, a malformed one included."""
        if not _could_be_a_name(name):
            return None  # no such user can exist: the store is not asked
        with self._rows.connection() as c:
            row = self._rows.by_name(c, name.strip().lower())
        return _user(row) if row is not None else None

    def list_users(self) -> list[User]:
        with self._rows.connection() as c:
            return [_user(r) for r in self._rows.all(c)]

    def authenticate(self, name: str, password: str, *, record: bool = True) -> User | None:
        """The enabled user with this name and password, or None; records the sign-in time
        unless ``record`` is false (a password check that is not a sign-in)."""
        with self._rows.transaction() as c:
            row = self._rows.by_name(c, name.strip().lower())
            stored = row["password_hash"] if row is not None else _DUMMY_HASH
            matches = check_password_hash(stored, password)
            if row is None or not matches or row["disabled"]:
                return None
            if record:
                self._rows.update(c, row["id"], last_login_at=now_ms())
            return _user(row)

    # -- failed sign-ins, for the console's throttle -------------------------------

    def recent_login_failures(self, key: str, since: int, limit: int) -> list[int]:
        """When ``key`` last failed to sign in, at or after ``since``: up to ``limit``
        times, newest first."""
        return self._rows.recent_login_failures(key, since, limit)

    def record_login_failure(self, key: str, at: int, forget_before: int) -> None:
        """Note a failed sign-in, and forget every failure older than ``forget_before``."""
        self._rows.record_login_failure(key, at, forget_before)

    def clear_login_failures(self, key: str) -> None:
        self._rows.clear_login_failures(key)

    def set_role(self, name: str, role: Role | str, *, actor: str = "api") -> User:
        """Change a user's role; refuses to demote the last enabled admin."""
        role = parse_role(role)
        change = _Change(actor, "set_role", lambda row: {"before": row["role"], "after": str(role)})
        return self._update(name, {"role": str(role)}, change, demotes=role is not Role.ADMIN)

    def set_disabled(self, name: str, disabled: bool, *, actor: str = "api") -> User:
        """Disable (or re-enable) a user; refuses to disable the last enabled admin.

        Disabling ends every session of the user."""
        change = _Change(actor, "disable" if disabled else "enable", lambda row: None)
        return self._update(
            name, {"disabled": disabled}, change, demotes=disabled, end_sessions=disabled
        )

    def set_password(self, name: str, password: str, *, actor: str = "api") -> User:
        """Give a user a new password; every session of theirs ends, a forced reset is done."""
        _check_password(password)
        hashed = generate_password_hash(password, method=PASSWORD_HASH_METHOD)
        change = _Change(actor, "set_password", lambda row: None)
        values = {"password_hash": hashed, "must_change_password": False}
        return self._update(name, values, change, demotes=False, end_sessions=True)

    def change_password(self, name: str, current: str, new: str) -> User | None:
        """A user changes their own password: None when ``current`` is not theirs.

        Raises InvalidInput when the new password is unusable or is the current one."""
        if self.authenticate(name, current, record=False) is None:
            return None
        if new == current:
            raise InvalidInput("new password", "is the same as the current one; choose another")
        return self.set_password(name, new, actor=name.strip().lower())

    def force_reset(self, name: str, *, actor: str = "api") -> User:
        """Make a user choose a new password at their next sign-in; their sessions end now."""
        change = _Change(actor, "force_reset", lambda row: None)
        values = {"must_change_password": True}
        return self._update(name, values, change, demotes=False, end_sessions=True)

    def end_sessions(self, user_id: int) -> None:
        """End every session of the user (sign-out). Not a change to record: it is routine."""
        with self._rows.transaction() as c:
            self._rows.raise_session_epoch(c, user_id)

    def recent_changes(self, limit: int = 50) -> list[UserChange]:
        """The newest ``limit`` changes to users, newest first."""
        with self._rows.connection() as c:
            rows = self._rows.recent_changes(c, limit)
        return [
            UserChange(r["at"], r["actor"], r["action"], r["user_name"], r["detail"]) for r in rows
        ]

    def count(self) -> int:
        with self._rows.connection() as c:
            return self._rows.count(c)

    def _update(
        self,
        name: str,
        values: dict[str, Any],
        change: _Change,
        *,
        demotes: bool,
        end_sessions: bool = False,
    ) -> User:
        if not _could_be_a_name(name):
            raise UnknownUser(visible(str(name)[:150]))
        name = name.strip().lower()
        check_text("actor", change.actor, limit=MAX_KEY)
        now = now_ms()
        with self._rows.transaction() as c:
            row = self._rows.by_name(c, name)
            if row is None:
                raise UnknownUser(name)
            last = demotes and _is_enabled_admin(row)
            if last and self._rows.count_enabled(c, str(Role.ADMIN)) <= 1:
                raise InvalidInput(
                    "user", f"{name!r} is the last enabled admin; make someone else admin first"
                )
            self._rows.update(c, row["id"], updated_at=now, **values)
            if end_sessions:
                self._rows.raise_session_epoch(c, row["id"])
            self._record(c, now, change.actor, change.action, name, change.detail(row))
            return _user(self._rows.by_name(c, name))

    def _record(
        self,
        c: Connection,
        at: int,
        actor: str,
        action: str,
        user: str,
        detail: dict[str, Any] | None,
    ) -> None:
        actor = (actor or "").strip()[:200] or "api"
        self._rows.record_change(c, at, actor, action, user, detail)


@dataclass(frozen=True)
class _Change:
    """What a change to a user is recorded as; ``detail`` reads the row before it."""

    actor: str
    action: str
    detail: Callable[[Row], dict[str, Any] | None]


def normalise_name(name: str) -> str:
    """A user name as stored: trimmed, lower case; raises InvalidInput when malformed."""
    text = (name or "").strip().lower()
    if not _NAME.match(text):
        raise InvalidInput(
            "user name",
            "use 1 to 150 letters, digits, '.', '_', '@' or '-', starting with a letter or digit",
        )
    return text


def parse_role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise InvalidInput(
            "role", f"{role!r} is not one of {', '.join(r.value for r in Role)}"
        ) from None


def _check_password(password: str) -> None:
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidInput("password", f"use {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    problem = problem_in_text(password)
    if problem is not None:  # the hash could not encode it
        raise InvalidInput("password", problem)


def _could_be_a_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.match(name.strip().lower()) is not None


def _is_enabled_admin(row: Row) -> bool:
    return bool(row["role"] == str(Role.ADMIN) and not row["disabled"])


def _user(row: Row | None) -> User:
    assert row is not None
    return User(
        id=int(row["id"]),
        name=row["name"],
        role=Role(row["role"]),
        disabled=bool(row["disabled"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        created_by=row["created_by"],
        last_login_at=row["last_login_at"],
        session_epoch=int(row["session_epoch"]),
        must_change_password=bool(row["must_change_password"]),
    )
