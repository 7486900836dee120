"""Origins: where an operator action came from, kept beside the actor it claims.

The doors' own tests check what each records (the CLI in test_cli_hostile.py,
the console's views in tests/console, the sweeper in test_sweeps.py); here are
the origin itself, the CLI's reading of its OS user and host when the system
is unhelpful, and the entries written before origins were kept.
"""

from __future__ import annotations

import getpass
import os
import pwd
import socket
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from engine.cli.context import shell_origin
from engine.display import visible
from engine.origins import MAX_DETAIL, Origin, OriginKind
from engine.queries import Queries
from engine.store import migrate, open_store
from engine.store.bulk import BulkStore

# -- the origin ---------------------------------------------------------------------


def test_an_origin_reads_as_its_kind_and_detail() -> None:
    assert str(Origin(OriginKind.CLI, "alice@ops-1")) == "cli: alice@ops-1"
    assert str(Origin.console("ann")) == "console: ann"
    assert str(Origin.api("deploy-bot")) == "api: deploy-bot"
    assert str(Origin(OriginKind.ENGINE)) == "engine"


def test_a_stored_kind_this_release_does_not_know_reads_as_unknown_keeping_what_it_said() -> None:
    assert Origin.of("cli", "alice@ops-1") == Origin(OriginKind.CLI, "alice@ops-1")
    assert Origin.of("webhook", "github") == Origin(OriginKind.UNKNOWN, "webhook: github")
    assert Origin.of("unknown") == Origin(OriginKind.UNKNOWN)


def test_a_detail_is_cut_to_the_column() -> None:
    assert Origin(OriginKind.CLI, "u@" + "h" * 300).detail == "u@" + "h" * (MAX_DETAIL - 2)


# -- the CLI's origin: the account the process runs as, never a failure --------------------


def test_the_cli_origin_is_the_processes_account_not_what_the_environment_claims(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("USER", "demo-admin")
    monkeypatch.setenv("LOGNAME", "demo-admin")
    account = pwd.getpwuid(os.getuid()).pw_name

    assert shell_origin() == Origin(OriginKind.CLI, f"{account}@{socket.gethostname()}")


def test_the_cli_origin_says_what_the_system_cannot_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_entry(uid: int) -> Any:
        raise KeyError(uid)

    def no_user() -> str:
        raise OSError("no user name")

    def no_host() -> str:
        raise OSError("no host name")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.setattr(getpass, "getuser", no_user)
    monkeypatch.setattr(socket, "gethostname", no_host)

    assert shell_origin() == Origin(OriginKind.CLI, f"uid {os.getuid()}@unknown host")


def test_a_name_that_is_not_utf8_is_kept_as_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    # os and pwd hand back undecodable bytes as lone surrogates, which no store can keep.
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: type("E", (), {"pw_name": "b\udcffd"}))
    monkeypatch.setattr(socket, "gethostname", lambda: "host\udcfe")

    origin = shell_origin()

    assert origin.detail == "b\\udcffd@host\\udcfe"
    assert visible(origin.detail) == origin.detail


# -- entries written before origins were kept ---------------------------------------------


def _before_origins(url: str) -> str:
    """The revision before the migration that added the origin columns."""
    scripts = ScriptDirectory.from_config(migrate.alembic_config(url))
    [adding] = [s for s in scripts.walk_revisions() if "origin" in (s.doc or "")]
    assert isinstance(adding.down_revision, str)
    return adding.down_revision


def test_entries_written_before_origins_were_kept_read_unknown(store_url: str) -> None:
    migrate.downgrade(store_url, _before_origins(store_url))
    try:
        db = sa.create_engine(store_url)
        with db.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO saga_operator_actions (at, actor, action, saga_id, reason, "
                    "state_before, state_after, version_before, version_after) VALUES "
                    "(1, 'ann', 'cancel', 's-1', 'old', 'running', 'cancelled', 1, 2)"
                )
            )
            conn.execute(
                sa.text(
                    "INSERT INTO saga_bulk_operations (id, action, reason, created_by, "
                    "created_at, selection, batch_size, rate_per_second, max_failure_rate, "
                    "status, total) VALUES ('b-1', 'cancel', 'old', 'ann', 1, "
                    "'{\"saga_name\": \"x\"}', 50, 5.0, 0.2, 'completed', 0)"
                )
            )
        db.dispose()
    finally:
        migrate.upgrade(store_url)

    store = open_store(store_url)
    try:
        [entry] = Queries(store).operator_actions()
        operation = BulkStore(store.db).get("b-1")
    finally:
        store.dispose()
    assert (entry.actor, entry.origin, entry.origin_detail) == ("ann", "unknown", None)
    assert (operation.origin, operation.origin_detail) == ("unknown", None)
