"""Users: the admin's page, the user store on both backends, and ``saga user`` commands."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient

from console.commands import user_group
from engine import InvalidInput
from engine.cli.context import shell_origin
from engine.store import open_store
from engine.store.schema import users as users_table
from engine.users import Role, UserStore
from tests.console.support import PASSWORD, sign_in, text

#: What the audit of user changes records for the CLI: the OS user and host, not $USER.
CLI_ACTOR = f"cli:{shell_origin().detail}"


class TestUsersPage:
    def test_lists_users_with_roles(self, admin: FlaskClient) -> None:
        html = text(admin.get("/users"))
        for name in ("viewer", "operator", "admin"):
            assert f'<td class="mono">{name}</td>' in html

    def test_adds_a_user_who_can_then_sign_in(self, admin: FlaskClient, app: Flask) -> None:
        response = admin.post(
            "/users", data={"name": "Dana", "role": "operator", "password": "a long secret"}
        )
        assert response.status_code == 302
        assert "Added dana as operator" in text(admin.get("/users"))
        sign_in(app.test_client(), "dana", "a long secret")

    @pytest.mark.parametrize(
        ("form", "problem"),
        [
            ({"name": "viewer", "role": "viewer", "password": "a long secret"}, "is taken"),
            ({"name": "bad name!", "role": "viewer", "password": "a long secret"}, "user name"),
            ({"name": "erin", "role": "viewer", "password": "short"}, "Password"),
            ({"name": "erin", "role": "root", "password": "a long secret"}, "Role"),
        ],
    )
    def test_refuses_bad_new_users_with_400(
        self, admin: FlaskClient, form: dict[str, str], problem: str
    ) -> None:
        response = admin.post("/users", data=form)
        assert response.status_code == 400
        assert problem in text(response)

    def test_changes_a_role(self, admin: FlaskClient, app: Flask) -> None:
        assert admin.post("/users/viewer/role", data={"role": "operator"}).status_code == 302
        assert app.extensions["saga"].users.by_name("viewer").role is Role.OPERATOR

    def test_every_change_is_recorded_with_who_made_it(
        self, admin: FlaskClient, app: Flask
    ) -> None:
        admin.post("/users", data={"name": "Dana", "role": "viewer", "password": "a long secret"})
        admin.post("/users/dana/role", data={"role": "operator"})
        admin.post("/users/dana/disable")
        admin.post("/users/nobody/disable")  # refused: nothing recorded

        changes = app.extensions["saga"].users.recent_changes()
        assert [(c.actor, c.action, c.user_name, c.detail) for c in changes[:3]] == [
            ("admin", "disable", "dana", None),
            ("admin", "set_role", "dana", {"before": "viewer", "after": "operator"}),
            ("admin", "add", "dana", {"role": "viewer"}),
        ]
        html = text(admin.get("/users")).split('id="user-changes"')[1]
        assert "set role: viewer → operator" in html and "disable" in html

    def test_disables_and_enables(self, admin: FlaskClient, app: Flask) -> None:
        assert admin.post("/users/operator/disable").status_code == 302
        assert app.extensions["saga"].users.by_name("operator").disabled
        assert admin.post("/users/operator/enable").status_code == 302
        assert not app.extensions["saga"].users.by_name("operator").disabled

    def test_the_last_admin_cannot_be_demoted_or_disabled(self, admin: FlaskClient) -> None:
        demoted = admin.post("/users/admin/role", data={"role": "viewer"})
        assert demoted.status_code == 400
        assert "last enabled admin" in text(demoted)
        assert admin.post("/users/admin/disable").status_code == 400
        assert admin.get("/users").status_code == 200

    def test_an_unknown_user_is_400(self, admin: FlaskClient) -> None:
        assert admin.post("/users/ghost/disable").status_code == 400

    @pytest.mark.parametrize("role", ["viewer", "operator"])
    def test_only_admins_change_users(self, app: Flask, role: str) -> None:
        client = sign_in(app.test_client(), role)
        assert (
            client.post(
                "/users", data={"name": "x1", "role": "admin", "password": "a long secret"}
            ).status_code
            == 403
        )
        assert client.post("/users/viewer/role", data={"role": "admin"}).status_code == 403
        assert client.post("/users/admin/disable").status_code == 403


class TestUserStore:
    @pytest.fixture
    def users(self, store_url: str) -> Iterator[UserStore]:
        store = open_store(store_url)
        yield UserStore(store.db)
        store.dispose()

    def test_stores_a_hash_not_the_password(self, users: UserStore) -> None:
        users.add("ann", PASSWORD, Role.OPERATOR)
        with users.db.connect() as c:
            stored = c.execute(sa.select(users_table.c.password_hash)).scalar_one()
        assert PASSWORD not in stored and stored.startswith("pbkdf2:")

    def test_authenticates_by_name_and_password(self, users: UserStore) -> None:
        added = users.add("Ann", PASSWORD, "viewer", created_by="test")
        assert added.name == "ann" and added.role is Role.VIEWER and added.created_by == "test"
        found = users.authenticate("ANN", PASSWORD)
        assert found is not None and found.id == added.id
        assert users.authenticate("ann", "wrong") is None
        assert users.authenticate("nobody", PASSWORD) is None
        assert users.by_name("ann").last_login_at is not None  # type: ignore[union-attr]

    def test_disabled_users_do_not_authenticate(self, users: UserStore) -> None:
        users.add("ann", PASSWORD, "admin")
        users.add("bob", PASSWORD, "admin")
        users.set_disabled("ann", True)
        assert users.authenticate("ann", PASSWORD) is None

    def test_changes_role_and_password(self, users: UserStore) -> None:
        users.add("ann", PASSWORD, "viewer")
        assert users.set_role("ann", "admin").role is Role.ADMIN
        users.set_password("ann", "another secret")
        assert users.authenticate("ann", "another secret") is not None
        assert users.authenticate("ann", PASSWORD) is None

    def test_keeps_one_enabled_admin(self, users: UserStore) -> None:
        users.add("root", PASSWORD, "admin")
        with pytest.raises(InvalidInput, match="last enabled admin"):
            users.set_role("root", "operator")
        with pytest.raises(InvalidInput, match="last enabled admin"):
            users.set_disabled("root", True)
        users.add("second", PASSWORD, "admin")
        users.set_disabled("root", True)
        assert users.list_users()[0].name == "root" and users.count() == 2

    @pytest.mark.parametrize(
        ("name", "password", "role"),
        [
            ("", PASSWORD, "viewer"),
            ("with space", PASSWORD, "viewer"),
            ("ann", "short", "viewer"),
            ("ann", PASSWORD, "superuser"),
        ],
    )
    def test_refuses_bad_input(self, users: UserStore, name: str, password: str, role: str) -> None:
        with pytest.raises(InvalidInput):
            users.add(name, password, role)
        assert users.count() == 0

    def test_roles_include_the_ones_before(self) -> None:
        assert Role.ADMIN.allows(Role.OPERATOR) and Role.OPERATOR.allows(Role.VIEWER)
        assert not Role.VIEWER.allows(Role.OPERATOR) and not Role.OPERATOR.allows(Role.ADMIN)


class TestUserCommands:
    @pytest.fixture
    def runner(self, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
        monkeypatch.setenv("SAGA_DATABASE_URL", sqlite_url)
        return CliRunner()

    def test_add_with_a_password_option(self, runner: CliRunner, sqlite_url: str) -> None:
        result = runner.invoke(
            user_group, ["add", "ann", "--role", "operator", "--password", PASSWORD]
        )
        assert result.exit_code == 0, result.output
        assert "added ann (operator)" in result.output
        store = open_store(sqlite_url)
        try:
            assert UserStore(store.db).authenticate("ann", PASSWORD) is not None
        finally:
            store.dispose()

    def test_add_prompts_for_the_password(self, runner: CliRunner) -> None:
        result = runner.invoke(user_group, ["add", "bob"], input=f"{PASSWORD}\n{PASSWORD}\n")
        assert result.exit_code == 0, result.output
        assert "added bob (viewer)" in result.output
        assert PASSWORD not in result.output

    def test_list_set_role_and_disable(
        self, runner: CliRunner, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("USER", "grace")
        runner.invoke(user_group, ["add", "ann", "--role", "admin", "--password", PASSWORD])
        runner.invoke(user_group, ["add", "bob", "--password", PASSWORD])
        assert runner.invoke(user_group, ["set-role", "bob", "operator"]).exit_code == 0
        assert runner.invoke(user_group, ["disable", "bob"]).exit_code == 0
        listed = runner.invoke(user_group, ["list"]).output
        assert "ann\tadmin\tactive" in listed and "bob\toperator\tdisabled" in listed
        store = open_store(sqlite_url)
        try:
            changes = UserStore(store.db).recent_changes()
        finally:
            store.dispose()
        assert [(c.actor, c.action, c.user_name) for c in changes] == [
            (CLI_ACTOR, "disable", "bob"),
            (CLI_ACTOR, "set_role", "bob"),
            (CLI_ACTOR, "add", "bob"),
            (CLI_ACTOR, "add", "ann"),
        ]

    def test_errors_are_reported_without_a_traceback(self, runner: CliRunner) -> None:
        runner.invoke(user_group, ["add", "ann", "--password", PASSWORD])
        result = runner.invoke(user_group, ["add", "ann", "--password", PASSWORD])
        assert result.exit_code == 2  # bad input, as for every command
        assert "'ann' is taken" in result.output
        assert "Traceback" not in result.output


class TestSetPasswordCommand:
    @pytest.fixture
    def runner(self, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
        monkeypatch.setenv("SAGA_DATABASE_URL", sqlite_url)
        monkeypatch.setenv("USER", "grace")
        runner = CliRunner()
        runner.invoke(user_group, ["add", "ann", "--password", PASSWORD])
        return runner

    @pytest.fixture
    def users(self, sqlite_url: str) -> Iterator[UserStore]:
        store = open_store(sqlite_url)
        yield UserStore(store.db)
        store.dispose()

    def test_prompts_twice_never_echoes_and_ends_every_session(
        self, runner: CliRunner, users: UserStore
    ) -> None:
        before = users.by_name("ann")
        new = "the new one, typed twice"
        result = runner.invoke(user_group, ["set-password", "ann"], input=f"{new}\n{new}\n")
        assert result.exit_code == 0, result.output
        assert new not in result.output
        assert "ann has a new password; their sessions have ended" in result.output
        after = users.by_name("ann")
        assert before is not None and after is not None
        assert after.session_epoch > before.session_epoch
        assert users.authenticate("ann", new) is not None
        assert users.authenticate("ann", PASSWORD) is None
        change = users.recent_changes()[0]
        assert (change.actor, change.action, change.user_name) == (
            CLI_ACTOR,
            "set_password",
            "ann",
        )

    def test_reads_the_password_from_stdin(self, runner: CliRunner, users: UserStore) -> None:
        result = runner.invoke(
            user_group, ["set-password", "ann", "--password-stdin"], input="from a pipe 123\n"
        )
        assert result.exit_code == 0, result.output
        assert "from a pipe" not in result.output
        assert users.authenticate("ann", "from a pipe 123") is not None

    def test_clears_a_forced_reset(self, runner: CliRunner, users: UserStore) -> None:
        users.force_reset("ann", actor="admin")
        runner.invoke(user_group, ["set-password", "ann", "--password-stdin"], input="x" * 12)
        after = users.by_name("ann")
        assert after is not None and after.must_change_password is False

    @pytest.mark.parametrize(
        ("args", "given", "code", "says"),
        [
            (["set-password", "nobody", "--password-stdin"], "long enough pw\n", 3, "no user"),
            (["set-password", "ann", "--password-stdin"], "short\n", 2, "password"),
            (["set-password", "ann", "--password-stdin"], "", 2, "password"),
        ],
    )
    def test_exit_codes_follow_the_cli_docs(
        self, runner: CliRunner, args: list[str], given: str, code: int, says: str
    ) -> None:
        result = runner.invoke(user_group, args, input=given)
        assert result.exit_code == code, result.output
        assert says in result.output
        assert "Traceback" not in result.output

    def test_add_reads_the_password_from_stdin_too(
        self, runner: CliRunner, users: UserStore
    ) -> None:
        result = runner.invoke(
            user_group, ["add", "bob", "--password-stdin"], input="piped password\n"
        )
        assert result.exit_code == 0, result.output
        assert users.authenticate("bob", "piped password") is not None
