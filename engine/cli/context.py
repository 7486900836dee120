"""What every command shares: the settings, the ``-A`` modules, and the store they open.

The ``saga`` group puts one :class:`Cli` on the click context; a command asks
it for the store or the engine, which are built once, on first use, after
checking that the store exists and is migrated. Nothing here creates a store:
only ``saga db upgrade`` (and ``saga demo``) do.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import click
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from engine.cli.errors import StoreNotReady
from engine.errors import InvalidInput
from engine.loader import AppModules, load_app
from engine.origins import Origin, OriginKind
from engine.registry import Registry
from engine.runtime import SagaEngine
from engine.settings import Settings
from engine.store import Store, backend_of, migrate, open_store, redacted, sqlite_path

if sys.platform != "win32":
    import pwd

log = logging.getLogger(__name__)

#: The database backends a store runs on, as SQLAlchemy names them.
BACKENDS = ("sqlite", "postgresql", "postgres")


@dataclass
class Cli:
    """Settings, the ``-A`` modules, and what commands build from them, once each."""

    settings: Settings
    app_names: tuple[str, ...]
    _app: AppModules | None = None
    _store: Store | None = None
    _engine: SagaEngine | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.settings.database_url

    def app(self) -> AppModules:
        if self._app is None:
            self._app = load_app(self.app_names)
        return self._app

    def registry(self) -> Registry:
        return Registry(self.app().sagas)

    def store(self) -> Store:
        """The store, after checking it exists and is migrated (never creates it)."""
        if self._engine is not None:
            return self._engine.store
        if self._store is None:
            require_store(self.url)
            self._store = open_store(self.url, pool_size=2)
            self.on_close(self._store.dispose)
        return self._store

    def engine(self) -> SagaEngine:
        """An engine with the ``-A`` sagas registered (hooks are for commands that run steps)."""
        if self._engine is None:
            app = self.app()
            require_store(self.url)
            self._engine = SagaEngine(app.sagas, settings=self.settings)
            self.on_close(self._engine.close)
        return self._engine

    @cached_property
    def origin(self) -> Origin:
        """What the audit log records as the origin of this command's actions."""
        return shell_origin()

    def on_close(self, closer: Callable[[], None]) -> None:
        """Call ``closer`` when the command ends, after those registered later."""
        self._closers.append(closer)

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()


pass_cli = click.make_pass_decorator(Cli)


def shell_origin() -> Origin:
    """``cli`` with the OS user and host running the command (``alice@ops-1``).

    ``--actor`` names whoever the caller likes; this names the account the
    process runs as, read from the password database by user id, since
    ``$USER`` and ``$LOGNAME`` are claims as well. It never fails: a part the
    system cannot tell is recorded as such.
    """
    return Origin(OriginKind.CLI, f"{_os_user()}@{_host()}")


def _os_user() -> str:
    if sys.platform != "win32":
        try:
            return _printable(pwd.getpwuid(os.getuid()).pw_name)
        except KeyError:  # a user id with no entry (a container's): the environment's word
            pass
    try:
        return _printable(getpass.getuser())
    except (OSError, KeyError, ImportError):
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown user"


def _host() -> str:
    try:
        return _printable(socket.gethostname()) or "unknown host"
    except OSError:
        return "unknown host"


def _printable(text: str) -> str:
    # Names the OS gives back as bytes that are not UTF-8 arrive as lone surrogates,
    # which the store refuses: kept as escapes instead.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def require_store(url: str) -> None:
    """Refuse to go on, without creating anything, unless the store is at the newest schema."""
    check_url(url)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        raise StoreNotReady(f"no store at {path}; create it with `saga db upgrade`")
    revision, head = migrate.current(url), schema_head(url)
    if revision is None:
        raise StoreNotReady(
            f"the store at {redacted(url)} has no saga tables; run `saga db upgrade`"
        )
    if revision == head:
        return
    if not is_known_revision(url, revision):
        # Migrations only add: a store upgraded by a newer release still works
        # with this one, which lets a rolling deploy upgrade the schema first.
        log.warning(
            "the store at %s is at schema %s, newer than this code's %s; going on",
            redacted(url),
            revision,
            head,
        )
        return
    raise StoreNotReady(
        f"the store at {redacted(url)} is at schema {revision}, this code needs {head}; "
        "run `saga db upgrade`"
    )


def check_url(url: str) -> None:
    """InvalidInput unless ``url`` names a SQLite or PostgreSQL database."""
    if backend_of(url) not in BACKENDS:
        raise InvalidInput(
            "SAGA_DATABASE_URL",
            f"{redacted(url)!r} is neither sqlite:///PATH nor postgresql://...",
        )


def schema_head(url: str) -> str | None:
    """The newest schema revision this code knows."""
    return _scripts(url).get_current_head()


def is_known_revision(url: str, revision: str) -> bool:
    """False for a revision of a newer release than this code."""
    try:
        _scripts(url).get_revision(revision)
    except CommandError:
        return False
    return True


def _scripts(url: str) -> ScriptDirectory:
    return ScriptDirectory.from_config(migrate.alembic_config(url))
