"""Operator actions through the console, on SQLite and on PostgreSQL.

Each action is offered only where the state and the role allow it, asks for
a reason on a confirmation page, sends the version the operator saw, and
lands in the audit log; a stale version answers 409 and applies nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from engine import Saga, SagaEngine, SagaState, Settings
from engine.queries import Queries
from tests.console.support import dead_lettered, make_app, make_engine, sign_in, text


class TestActions:
    @pytest.fixture
    def saga_engine(self, store_url: str) -> Iterator[SagaEngine]:
        eng = make_engine(store_url)
        yield eng
        eng.close()

    @pytest.fixture
    def app(self, saga_engine: SagaEngine) -> Flask:
        return make_app(saga_engine)

    def _audit(self, saga_engine: SagaEngine, saga_id: str) -> list[tuple[str, str, str]]:
        return [
            (a.actor, a.action, a.reason)
            for a in Queries(saga_engine.store).operator_actions(saga_id=saga_id)
        ]

    def test_confirmation_says_what_will_happen_and_carries_the_version(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        response = operator.get(f"/sagas/{inst.id}/actions/retry?version={inst.version}")
        html = text(response)
        assert response.status_code == 200
        assert "Runs step “ship” again now" in html
        assert f'name="expected_version" value="{inst.version}"' in html
        assert 'name="reason"' in html and "required" in html

    def test_retry_applies_with_the_reason_and_lands_in_the_audit_log(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        response = operator.post(
            f"/sagas/{inst.id}/actions/retry",
            data={"reason": "carrier is back", "expected_version": inst.version},
        )
        assert response.status_code == 302
        assert response.location == f"/sagas/{inst.id}"
        assert saga_engine.get(inst.id).state is SagaState.RUNNING
        assert self._audit(saga_engine, inst.id) == [("operator", "retry", "carrier is back")]
        [entry] = Queries(saga_engine.store).operator_actions(saga_id=inst.id)
        assert (entry.origin, entry.origin_detail) == ("console", "operator")
        page = text(operator.get(response.location))
        assert "Retry now: done" in page
        assert "carrier is back" in page.split('id="operator-actions"')[1]

    @pytest.mark.parametrize(
        ("action", "state"),
        [
            ("skip", SagaState.RUNNING),
            ("compensate", SagaState.COMPENSATED),
            ("cancel", SagaState.CANCELLED),
        ],
    )
    def test_skip_compensate_and_cancel(
        self, operator: FlaskClient, saga_engine: SagaEngine, action: str, state: SagaState
    ) -> None:
        inst = saga_engine.start("order", {}).instance
        response = operator.post(
            f"/sagas/{inst.id}/actions/{action}",
            data={"reason": f"test {action}", "expected_version": inst.version},
        )
        assert response.status_code == 302
        assert saga_engine.get(inst.id).state is state
        assert self._audit(saga_engine, inst.id) == [("operator", action, f"test {action}")]

    def test_a_stale_version_is_409_and_nothing_is_applied(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        saga_engine.operations.retry(inst.id, actor="someone-else", reason="first")
        moved = saga_engine.get(inst.id)
        response = operator.post(
            f"/sagas/{inst.id}/actions/cancel",
            data={"reason": "too late", "expected_version": inst.version},
        )
        html = text(response)
        assert response.status_code == 409
        assert "The saga changed since you looked at it" in html
        assert f"You saw version {inst.version}" in html
        assert f"it is now version {moved.version}" in html
        assert "operator retry" in html  # what changed, from the timeline
        after = saga_engine.get(inst.id)
        assert (after.state, after.version) == (moved.state, moved.version)
        assert [a[0] for a in self._audit(saga_engine, inst.id)] == ["someone-else"]

    def test_opening_the_confirmation_with_a_stale_version_is_409(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        saga_engine.operations.retry(inst.id, actor="someone-else", reason="first")
        response = operator.get(f"/sagas/{inst.id}/actions/skip?version={inst.version}")
        assert response.status_code == 409

    def test_an_action_the_state_does_not_allow_is_409(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        done = saga_engine.run("order", {})
        page = operator.get(f"/sagas/{done.id}/actions/retry")
        assert page.status_code == 409
        posted = operator.post(
            f"/sagas/{done.id}/actions/cancel",
            data={"reason": "x", "expected_version": done.version},
        )
        assert posted.status_code == 409
        assert "it has already finished" in text(posted)
        assert saga_engine.get(done.id).version == done.version

    def test_force_compensate_past_the_pivot_is_409(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        response = operator.post(
            f"/sagas/{inst.id}/actions/compensate",
            data={"reason": "undo it", "expected_version": inst.version},
        )
        assert response.status_code == 409
        assert "passed its pivot" in text(response)

    def test_a_missing_reason_is_400_and_nothing_is_applied(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        response = operator.post(
            f"/sagas/{inst.id}/actions/retry",
            data={"reason": "   ", "expected_version": inst.version},
        )
        assert response.status_code == 400
        assert "Say why you are doing this." in text(response)
        assert saga_engine.get(inst.id).version == inst.version

    @pytest.mark.parametrize("version", ["", "abc", "0", "-3"])
    def test_a_tampered_version_is_400(
        self, operator: FlaskClient, saga_engine: SagaEngine, version: str
    ) -> None:
        inst = dead_lettered(saga_engine)
        response = operator.post(
            f"/sagas/{inst.id}/actions/retry", data={"reason": "x", "expected_version": version}
        )
        assert response.status_code == 400
        assert saga_engine.get(inst.id).version == inst.version

    def test_an_unknown_action_is_400(self, operator: FlaskClient, saga_engine: SagaEngine) -> None:
        inst = dead_lettered(saga_engine)
        assert operator.get(f"/sagas/{inst.id}/actions/delete").status_code == 400

    def test_an_unknown_saga_id_is_404(self, operator: FlaskClient) -> None:
        response = operator.post(
            "/sagas/nope/actions/retry", data={"reason": "x", "expected_version": 1}
        )
        assert response.status_code == 404

    @pytest.mark.parametrize("method", ["get", "post"])
    def test_viewers_cannot_act(
        self, viewer: FlaskClient, saga_engine: SagaEngine, method: str
    ) -> None:
        inst = dead_lettered(saga_engine)
        call = getattr(viewer, method)
        response = call(
            f"/sagas/{inst.id}/actions/retry",
            data={"reason": "x", "expected_version": inst.version},
        )
        assert response.status_code == 403
        assert "needs the operator role" in text(response)
        assert saga_engine.get(inst.id).version == inst.version

    def test_admins_can_act(self, admin: FlaskClient, saga_engine: SagaEngine) -> None:
        inst = dead_lettered(saga_engine)
        response = admin.post(
            f"/sagas/{inst.id}/actions/skip",
            data={"reason": "shipped by hand", "expected_version": inst.version},
        )
        assert response.status_code == 302
        assert saga_engine.get(inst.id).state is SagaState.COMPLETED


def test_a_saga_the_console_does_not_know_is_shown_without_actions(sqlite_url: str) -> None:
    other = Saga("elsewhere")
    other.add_step("only", lambda ctx: None)
    writer = SagaEngine([other], settings=Settings(database_url=sqlite_url))
    inst = writer.start("elsewhere", {}).instance
    writer.close()
    console_engine = make_engine(sqlite_url)
    try:
        client = sign_in(make_app(console_engine).test_client(), "operator")
        page = text(client.get(f"/sagas/{inst.id}"))
        assert "does not load the definition of" in page
        response = client.post(
            f"/sagas/{inst.id}/actions/cancel",
            data={"reason": "x", "expected_version": inst.version},
        )
        assert response.status_code == 409
        assert "Saga definition not loaded" in text(response)
    finally:
        console_engine.close()
