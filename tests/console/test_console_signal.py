"""Sending a signal to a waiting step from the console, on SQLite and on PostgreSQL.

The *Send signal* button shows for operators while a step can still take a
signal (it waits now, or has yet to begin, and none is stored); its form
takes JSON data and a reason, carries the version the operator saw, delivers
through ``engine.signals`` as the operator and lands in the audit log.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from markupsafe import escape

from engine import NO_RETRY, Saga, SagaEngine, SagaState, Settings, StepContext
from engine.model import Instance, now_ms
from engine.queries import Queries
from engine.states import StepStatus
from tests.console.console_sagas import SAGAS, SCRIPT
from tests.console.support import PASSWORD, make_app, sign_in, text

EVENT = "manager_approval"
WAIT = 1  # the waiting step's index
TIMEOUT = timedelta(hours=1)


def prepare(ctx: StepContext) -> dict[str, Any]:
    return {"prepared": True}


def unprepare(ctx: StepContext, output: Any) -> None:
    return None


def ship(ctx: StepContext) -> dict[str, Any]:
    return {"shipped": True}


approve = Saga("approve", default_retry=NO_RETRY, default_compensation_retry=NO_RETRY)
approve.add_step("prepare", prepare, unprepare)
approve.wait_for(EVENT, timeout=TIMEOUT)
approve.add_step("ship", ship)


class Clock:
    """The engine's clock, which a test can move past the wait's deadline."""

    def __init__(self) -> None:
        self.ahead_ms = 0

    def __call__(self) -> int:
        return now_ms() + self.ahead_ms


def _token(html: str) -> str:
    found = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', html)
    assert found is not None, "no CSRF token in the page"
    return found.group(1)


class TestSendSignal:
    @pytest.fixture
    def clock(self) -> Clock:
        return Clock()

    @pytest.fixture
    def saga_engine(self, store_url: str, clock: Clock) -> Iterator[SagaEngine]:
        settings = Settings(database_url=store_url, worker_id="test-worker", poll_seconds=0.05)
        eng = SagaEngine([*SAGAS, approve], settings=settings, clock=clock)
        yield eng
        eng.close()

    @pytest.fixture
    def app(self, saga_engine: SagaEngine) -> Flask:
        return make_app(saga_engine)

    # -- helpers ------------------------------------------------------------------

    def _waiting(self, saga_engine: SagaEngine) -> Instance:
        """An instance whose wait for the signal has begun (no worker runs, so it stays)."""
        inst = saga_engine.run("approve", {"order": "A-1"})
        assert inst.cursor == WAIT and inst.steps[WAIT].status is StepStatus.RUNNING
        return inst

    def _not_begun(self, saga_engine: SagaEngine) -> Instance:
        """An instance that has not reached its wait yet."""
        return saga_engine.start("approve", {"order": "A-2"}).instance

    def _send(
        self, client: FlaskClient, inst: Instance, data: str, reason: str = "approved by phone"
    ) -> Any:
        return client.post(
            f"/sagas/{inst.id}/signals/{EVENT}",
            data={"signal_data": data, "reason": reason, "expected_version": inst.version},
        )

    def _audit(self, saga_engine: SagaEngine, saga_id: str) -> list[tuple[str, str, str]]:
        return [
            (a.actor, a.action, a.reason)
            for a in Queries(saga_engine.store).operator_actions(saga_id=saga_id)
        ]

    def _button(self, html: str) -> bool:
        return f'data-event="{EVENT}"' in html and 'id="signals"' in html

    # -- the button ---------------------------------------------------------------

    def test_the_button_shows_for_an_operator_while_the_step_waits(
        self, operator: FlaskClient, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._waiting(saga_engine)
        html = text(operator.get(f"/sagas/{inst.id}"))
        assert self._button(html)
        assert f'href="/sagas/{inst.id}/signals/{EVENT}?version={inst.version}"' in html
        assert "waits for it now" in html
        assert not self._button(text(viewer.get(f"/sagas/{inst.id}")))

    def test_the_button_shows_before_the_wait_begins_until_a_signal_is_kept(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._not_begun(saga_engine)
        html = text(operator.get(f"/sagas/{inst.id}"))
        assert self._button(html) and "has not begun waiting" in html
        saga_engine.signal(inst.id, EVENT, {"early": True})
        assert not self._button(text(operator.get(f"/sagas/{inst.id}")))

    def test_no_button_once_the_wait_ended_or_for_a_saga_without_waits(
        self, operator: FlaskClient, saga_engine: SagaEngine, clock: Clock
    ) -> None:
        taken = self._waiting(saga_engine)
        saga_engine.signal(taken.id, EVENT, "ok")
        assert not self._button(text(operator.get(f"/sagas/{taken.id}")))
        expired = self._waiting(saga_engine)
        clock.ahead_ms = int(TIMEOUT.total_seconds() * 1000) + 1
        assert not self._button(text(operator.get(f"/sagas/{expired.id}")))
        order = saga_engine.start("order", {}).instance
        assert 'id="signals"' not in text(operator.get(f"/sagas/{order.id}"))

    # -- the form -----------------------------------------------------------------

    def test_the_form_names_the_event_and_carries_the_version(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._waiting(saga_engine)
        response = operator.get(f"/sagas/{inst.id}/signals/{EVENT}?version={inst.version}")
        html = text(response)
        assert response.status_code == 200
        assert f'<span class="mono" id="signal-event">{EVENT}</span>' in html
        assert "waits for this event now" in html
        assert f'name="expected_version" value="{inst.version}"' in html
        assert 'name="signal_data"' in html and 'name="reason"' in html

    def test_the_form_for_an_event_nothing_waits_for_is_409(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._waiting(saga_engine)
        response = operator.get(f"/sagas/{inst.id}/signals/hr_approval?version={inst.version}")
        assert response.status_code == 409
        assert "no step of saga &#39;approve&#39; waits for that event" in text(response)

    # -- sending ------------------------------------------------------------------

    def test_sending_delivers_the_data_and_the_saga_moves_on(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._waiting(saga_engine)
        response = self._send(operator, inst, '{"approved": true, "by": "Grace"}')
        assert response.status_code == 302
        assert response.location == f"/sagas/{inst.id}"
        after = saga_engine.get(inst.id)
        assert after.steps[WAIT].status is StepStatus.SUCCEEDED
        assert after.steps[WAIT].output == {"approved": True, "by": "Grace"}
        assert (after.state, after.current.name) == (SagaState.RUNNING, "ship")
        signal = saga_engine.store.stored_signal(inst.id, EVENT)
        assert signal is not None and signal.sent_by == "operator"
        page = text(operator.get(response.location))
        assert f"Signal “{EVENT}” sent by operator. The step took it" in page
        assert not self._button(page)

    def test_the_signal_lands_in_the_audit_log_with_the_reason(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._waiting(saga_engine)
        self._send(operator, inst, '{"approved": true}', reason="manager said yes (INC-7)")
        assert self._audit(saga_engine, inst.id) == [
            ("operator", "signal", "manager said yes (INC-7)")
        ]
        [row] = Queries(saga_engine.store).operator_actions(saga_id=inst.id)
        assert row.step_name == EVENT
        assert (row.version_before, row.version_after) == (inst.version, inst.version + 1)
        assert row.detail == {"event": EVENT, "data": {"approved": True}, "taken": True}
        assert (row.origin, row.origin_detail) == ("console", "operator")
        audit = text(operator.get("/audit")).split('id="audit"')[1]
        for shown in (
            "operator",
            "signal",
            inst.id,
            "manager said yes (INC-7)",
            "&#34;approved&#34;: true",
        ):
            assert shown in audit
        filtered = operator.get("/audit?action=signal")
        assert filtered.status_code == 200 and inst.id in text(filtered)

    def test_a_signal_before_the_wait_is_kept_and_audited(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._not_begun(saga_engine)
        response = self._send(operator, inst, "[1, 2]", reason="approved ahead")
        assert response.status_code == 302
        assert "It is stored: the step takes it" in text(operator.get(response.location))
        signal = saga_engine.store.stored_signal(inst.id, EVENT)
        assert signal is not None and signal.data == [1, 2]
        assert saga_engine.get(inst.id).version == inst.version
        [row] = Queries(saga_engine.store).operator_actions(saga_id=inst.id)
        assert (row.actor, row.action, row.reason) == ("operator", "signal", "approved ahead")
        assert (row.version_before, row.version_after, row.step_name) == (
            inst.version,
            inst.version,
            EVENT,
        )
        assert row.detail == {"event": EVENT, "data": [1, 2], "taken": False}

    def test_empty_data_sends_null(self, operator: FlaskClient, saga_engine: SagaEngine) -> None:
        inst = self._waiting(saga_engine)
        assert self._send(operator, inst, "  \n").status_code == 302
        after = saga_engine.get(inst.id)
        assert after.steps[WAIT].status is StepStatus.SUCCEEDED
        assert after.steps[WAIT].output is None

    @pytest.mark.parametrize("method", ["get", "post"])
    def test_viewers_get_403_and_nothing_is_sent(
        self, viewer: FlaskClient, saga_engine: SagaEngine, method: str
    ) -> None:
        inst = self._waiting(saga_engine)
        call = getattr(viewer, method)
        response = call(
            f"/sagas/{inst.id}/signals/{EVENT}",
            data={"signal_data": "true", "reason": "x", "expected_version": inst.version},
        )
        assert response.status_code == 403
        assert saga_engine.store.stored_signal(inst.id, EVENT) is None

    # -- bad input: the form again, with what was typed ----------------------------------

    def test_invalid_json_is_shown_where_it_fails_and_keeps_what_was_typed(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._waiting(saga_engine)
        typed = '{"approved": tru}'
        response = self._send(operator, inst, typed, reason="my careful reason")
        html = text(response)
        assert response.status_code == 400
        assert "not JSON: Expecting value at line 1, column 14" in html
        assert str(escape(typed)) in html
        assert "my careful reason" in html
        assert f'name="expected_version" value="{inst.version}"' in html
        assert saga_engine.store.stored_signal(inst.id, EVENT) is None

    @pytest.mark.parametrize("typed", ['{"rate": NaN}', '"nul \\u0000 here"'])
    def test_data_the_store_cannot_keep_is_refused_on_the_form(
        self, operator: FlaskClient, saga_engine: SagaEngine, typed: str
    ) -> None:
        inst = self._waiting(saga_engine)
        response = self._send(operator, inst, typed)
        html = text(response)
        assert response.status_code == 400
        assert "The data was not sent: the store cannot keep it" in html
        assert str(escape(typed)) in html
        assert saga_engine.store.stored_signal(inst.id, EVENT) is None

    def test_a_missing_reason_is_400_and_keeps_the_data(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._waiting(saga_engine)
        response = self._send(operator, inst, '{"approved": false}', reason="  ")
        html = text(response)
        assert response.status_code == 400
        assert "Say why you are doing this." in html
        assert str(escape('{"approved": false}')) in html
        assert saga_engine.store.stored_signal(inst.id, EVENT) is None

    def test_a_stale_version_gives_the_conflict_page_and_sends_nothing(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._waiting(saga_engine)
        saga_engine.signal(inst.id, EVENT, {"by": "someone else"}, sent_by="grace")
        moved = saga_engine.get(inst.id)
        response = self._send(operator, inst, '{"by": "me"}')
        html = text(response)
        assert response.status_code == 409
        assert "The saga changed since you looked at it" in html
        assert f"You saw version {inst.version}" in html
        assert f"it is now version {moved.version}" in html
        signal = saga_engine.store.stored_signal(inst.id, EVENT)
        assert signal is not None and signal.sent_by == "grace"
        assert self._audit(saga_engine, inst.id) == []

    def test_a_signal_the_engine_refuses_shows_its_message_on_the_form(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._not_begun(saga_engine)
        saga_engine.signal(inst.id, EVENT, "first", sent_by="webhook")
        # A kept signal leaves the version as it was: only the engine can refuse this one.
        response = self._send(operator, inst, '"second"', reason="resend")
        html = text(response)
        assert response.status_code == 409
        assert "Nothing was sent: cannot deliver the" in html
        assert "a signal for that event is already stored" in html
        assert str(escape('"second"')) in html and "resend" in html
        signal = saga_engine.store.stored_signal(inst.id, EVENT)
        assert signal is not None and signal.data == "first"
        assert self._audit(saga_engine, inst.id) == []

    def test_a_wait_past_its_deadline_is_refused(
        self, operator: FlaskClient, saga_engine: SagaEngine, clock: Clock
    ) -> None:
        inst = self._waiting(saga_engine)
        clock.ahead_ms = int(TIMEOUT.total_seconds() * 1000) + 1
        form = operator.get(f"/sagas/{inst.id}/signals/{EVENT}?version={inst.version}")
        assert form.status_code == 409
        response = self._send(operator, inst, "true")
        assert response.status_code == 409
        assert "stopped waiting at its deadline" in text(response)
        assert saga_engine.store.stored_signal(inst.id, EVENT) is None

    # -- untrusted text -------------------------------------------------------------

    def test_html_in_the_data_and_the_reason_is_escaped(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._waiting(saga_engine)
        data = '{"note": "' + SCRIPT.replace("'", "\\u0027") + '"}'
        assert self._send(operator, inst, data, reason=SCRIPT).status_code == 302
        for page in (f"/sagas/{inst.id}", "/audit"):
            html = text(operator.get(page))
            assert SCRIPT not in html
            assert "&lt;script&gt;" in html
        outputs = text(operator.get(f"/sagas/{inst.id}")).split('id="outputs"')[1]
        assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in outputs

    # -- CSRF ---------------------------------------------------------------------

    def test_without_the_csrf_token_nothing_is_sent(self, saga_engine: SagaEngine) -> None:
        client = self._signed_in_with_csrf(saga_engine)
        inst = self._waiting(saga_engine)
        refused = self._send(client, inst, "true")
        assert refused.status_code == 400
        assert "Form expired or tampered" in text(refused)
        assert saga_engine.store.stored_signal(inst.id, EVENT) is None
        form = text(client.get(f"/sagas/{inst.id}/signals/{EVENT}?version={inst.version}"))
        sent = client.post(
            f"/sagas/{inst.id}/signals/{EVENT}",
            data={
                "signal_data": "true",
                "reason": "with the token",
                "expected_version": inst.version,
                "csrf_token": _token(form),
            },
        )
        assert sent.status_code == 302
        assert saga_engine.get(inst.id).steps[WAIT].output is True

    def _signed_in_with_csrf(self, saga_engine: SagaEngine) -> FlaskClient:
        client = make_app(saga_engine, WTF_CSRF_ENABLED=True).test_client()
        token = _token(text(client.get("/login")))
        response = client.post(
            "/login", data={"name": "operator", "password": PASSWORD, "csrf_token": token}
        )
        assert response.status_code == 302
        return client


def test_admins_can_send_a_signal(sqlite_url: str) -> None:
    settings = Settings(database_url=sqlite_url, worker_id="test-worker")
    eng = SagaEngine([*SAGAS, approve], settings=settings)
    try:
        client = sign_in(make_app(eng).test_client(), "admin")
        inst = eng.run("approve", {})
        response = client.post(
            f"/sagas/{inst.id}/signals/{EVENT}",
            data={"signal_data": "1", "reason": "admin", "expected_version": inst.version},
        )
        assert response.status_code == 302
        assert eng.get(inst.id).steps[WAIT].output == 1
    finally:
        eng.close()
