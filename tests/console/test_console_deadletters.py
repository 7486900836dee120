"""The dead-letter page and its four actions, and the stuck tab, through the test client.

Every dead-lettered instance is listed with its failing step, error, first
and last failure and attempts. Retry, skip, edit-then-retry and resolve by
hand each confirm first, need a reason and the operator role, carry the
version the operator saw (409 on a race, nothing applied), and land in the
audit log; the edit keeps the payload before and after. Bad input answers
400, an unknown id 404; untrusted error text renders inert.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from engine import SagaEngine, SagaState
from engine.model import Instance
from engine.queries import Queries
from tests.console.console_sagas import SCRIPT
from tests.console.support import PASSWORD, dead_lettered, make_app, make_engine, text

CHOICES = ("retry", "skip", "edit-retry", "resolve")


def audit(saga_engine: SagaEngine, saga_id: str) -> list[tuple[str, str, str]]:
    return [
        (a.actor, a.action, a.reason)
        for a in Queries(saga_engine.store).operator_actions(saga_id=saga_id)
    ]


def post(client: FlaskClient, inst: Instance, choice: str, **data: object) -> object:
    form = {"reason": f"test {choice}", "expected_version": inst.version, **data}
    return client.post(f"/dead-letters/{inst.id}/{choice}", data=form)


class TestTheQueue:
    def test_lists_each_dead_letter_with_step_error_failures_and_attempts(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine, "ORD-7")
        saga_engine.run("order", {}, business_key="ORD-FINE")

        html = text(viewer.get("/dead-letters"))

        row = html.split(f'id="dl-{inst.id}"')[1].split("</tr>")[0]
        assert "ORD-7" in row and "<b>ship</b>" in row
        assert "carrier rejected parcel for ORD-7" in row
        assert len(re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}", row)) == 2
        assert '<td class="num">1</td>' in row  # one attempt (ship has no retries)
        assert "ORD-FINE" not in html

    def test_a_viewer_sees_no_action_buttons_an_operator_sees_four(
        self, viewer: FlaskClient, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        as_viewer = text(viewer.get("/dead-letters"))
        as_operator = text(operator.get("/dead-letters"))
        for choice in CHOICES:
            link = f"/dead-letters/{inst.id}/{choice}?version={inst.version}"
            assert link not in as_viewer
            assert link in as_operator
        assert "signed in as a viewer" in as_viewer

    def test_filters_and_pages(self, viewer: FlaskClient, saga_engine: SagaEngine) -> None:
        first = dead_lettered(saga_engine, "ORD-1")
        second = dead_lettered(saga_engine, "ORD-2")
        hostile = saga_engine.run("hostile", {}, business_key="H-1")

        only_order = text(viewer.get("/dead-letters?saga=order&step=ship"))
        assert first.id in only_order and second.id in only_order
        assert hostile.id not in only_order
        assert "nothing waits" in text(viewer.get("/dead-letters?step=nope"))

    def test_a_malformed_cursor_is_400(self, viewer: FlaskClient) -> None:
        response = viewer.get("/dead-letters?before=yesterday")
        assert response.status_code == 400
        assert "not a page cursor" in text(response)

    def test_needs_sign_in(self, anon: FlaskClient) -> None:
        response = anon.get("/dead-letters")
        assert response.status_code == 302 and "/login" in response.location

    def test_error_text_renders_inert(self, viewer: FlaskClient, saga_engine: SagaEngine) -> None:
        saga_engine.run("hostile", {"note": SCRIPT}, business_key="H-9")
        html = text(viewer.get("/dead-letters"))
        assert SCRIPT not in html
        assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in html


class TestActing:
    @pytest.fixture
    def saga_engine(self, store_url: str) -> Iterator[SagaEngine]:
        eng = make_engine(store_url)
        yield eng
        eng.close()

    @pytest.fixture
    def app(self, saga_engine: SagaEngine) -> Flask:
        return make_app(saga_engine)

    @pytest.mark.parametrize("choice", CHOICES)
    def test_a_viewer_is_refused_and_nothing_changes(
        self, viewer: FlaskClient, saga_engine: SagaEngine, choice: str
    ) -> None:
        inst = dead_lettered(saga_engine)
        assert viewer.get(f"/dead-letters/{inst.id}/{choice}").status_code == 403
        response = post(viewer, inst, choice, payload='{"amount": 1}')
        assert response.status_code == 403  # type: ignore[attr-defined]
        assert saga_engine.get(inst.id).version == inst.version
        assert audit(saga_engine, inst.id) == []

    def test_retry_confirms_then_applies_and_returns_to_the_queue(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        page = text(operator.get(f"/dead-letters/{inst.id}/retry?version={inst.version}"))
        assert "Runs step “ship” again now" in page
        assert "carrier rejected parcel" in page  # why it stopped, on the confirmation
        assert f'name="expected_version" value="{inst.version}"' in page

        response = post(operator, inst, "retry", reason="carrier is back")

        assert response.status_code == 302  # type: ignore[attr-defined]
        assert response.location == "/dead-letters"  # type: ignore[attr-defined]
        assert saga_engine.get(inst.id).state is SagaState.RUNNING
        assert audit(saga_engine, inst.id) == [("operator", "retry", "carrier is back")]
        queue = text(operator.get("/dead-letters"))
        assert "Retry: done by operator" in queue and inst.id not in queue.split("<tbody>")[1]

    def test_skip_goes_on_past_the_step(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        post(operator, inst, "skip", reason="shipped by hand")
        assert saga_engine.get(inst.id).state is SagaState.COMPLETED
        assert audit(saga_engine, inst.id) == [("operator", "skip", "shipped by hand")]

    def test_edit_then_retry_changes_the_payload_and_the_audit_log_keeps_both(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine, amount=5)
        form = text(operator.get(f"/dead-letters/{inst.id}/edit-retry?version={inst.version}"))
        assert "&#34;amount&#34;: 5" in form  # the current payload, ready to edit
        assert "Replaces the saga&#39;s payload" in form

        response = post(
            operator, inst, "edit-retry", payload='{"amount": 7}', reason="amount was wrong"
        )

        assert response.status_code == 302  # type: ignore[attr-defined]
        after = saga_engine.get(inst.id)
        assert after.payload == {"amount": 7} and after.state is SagaState.RUNNING
        (entry,) = Queries(saga_engine.store).operator_actions(saga_id=inst.id)
        assert (entry.action, entry.reason) == ("edit_retry", "amount was wrong")
        assert (entry.origin, entry.origin_detail) == ("console", "operator")
        assert entry.detail == {"payload_before": {"amount": 5}, "payload_after": {"amount": 7}}
        log = text(operator.get("/audit?action=edit_retry"))
        assert "Payload edited: before and after" in log
        assert "&#34;amount&#34;: 5" in log and "&#34;amount&#34;: 7" in log

    @pytest.mark.parametrize(
        ("payload", "problem"),
        [
            ('{"amount": ', "it is not JSON: Expecting value at line 1, column 12"),
            ('{"amount": 5}', "is the same as the saga"),
        ],
    )
    def test_a_bad_or_unchanged_payload_shows_the_form_again_with_400(
        self, operator: FlaskClient, saga_engine: SagaEngine, payload: str, problem: str
    ) -> None:
        inst = dead_lettered(saga_engine, amount=5)
        response = post(operator, inst, "edit-retry", payload=payload)
        html = text(response)
        assert response.status_code == 400  # type: ignore[attr-defined]
        assert problem in html.replace("&#39;", "'")
        assert "The payload was not changed" in html
        assert saga_engine.get(inst.id).version == inst.version

    def test_resolve_by_hand_ends_it_cancelled_and_empties_the_queue(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        page = text(operator.get(f"/dead-letters/{inst.id}/resolve?version={inst.version}"))
        assert "ends the saga cancelled" in page

        post(operator, inst, "resolve", reason="refunded and shipped by hand")

        assert saga_engine.get(inst.id).state is SagaState.CANCELLED
        assert audit(saga_engine, inst.id) == [
            ("operator", "resolve", "refunded and shipped by hand")
        ]
        assert Queries(saga_engine.store).dead_lettered().items == []

    def test_from_the_instance_page_it_returns_there(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        page = text(operator.get(f"/sagas/{inst.id}"))
        link = f"/dead-letters/{inst.id}/edit-retry?version={inst.version}&amp;back=instance"
        assert link in page
        response = operator.post(
            f"/dead-letters/{inst.id}/resolve?back=instance",
            data={"reason": "done by hand", "expected_version": inst.version},
        )
        assert response.location == f"/sagas/{inst.id}"

    @pytest.mark.parametrize("choice", CHOICES)
    def test_a_stale_version_is_409_and_applies_nothing(
        self, operator: FlaskClient, saga_engine: SagaEngine, choice: str
    ) -> None:
        inst = dead_lettered(saga_engine)
        saga_engine.operations.retry(inst.id, actor="colleague", reason="first")
        moved = saga_engine.get(inst.id)

        response = post(operator, inst, choice, payload='{"amount": 9}')

        assert response.status_code == 409  # type: ignore[attr-defined]
        assert f"You saw version {inst.version}" in text(response)
        assert saga_engine.get(inst.id).version == moved.version
        assert [a[0] for a in audit(saga_engine, inst.id)] == ["colleague"]

    def test_opening_a_confirmation_with_an_old_version_is_409(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        saga_engine.operations.cancel(inst.id, actor="colleague", reason="gone")
        response = operator.get(f"/dead-letters/{inst.id}/retry?version={inst.version}")
        assert response.status_code == 409

    def test_an_instance_that_is_not_dead_lettered_is_409(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        done = saga_engine.run("order", {}, business_key="ORD-OK")
        response = operator.get(f"/dead-letters/{done.id}/resolve")
        assert response.status_code == 409
        assert "no longer dead-lettered" in text(response)

    def test_unknown_id_is_404_unknown_choice_and_missing_reason_are_400(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        assert operator.get("/dead-letters/nope/retry").status_code == 404
        assert operator.get(f"/dead-letters/{inst.id}/explode").status_code == 400
        missing = post(operator, inst, "retry", reason="  ")
        assert missing.status_code == 400  # type: ignore[attr-defined]
        assert "Say why you are doing this" in text(missing)
        tampered = post(operator, inst, "retry", expected_version="abc")
        assert tampered.status_code == 400  # type: ignore[attr-defined]
        assert saga_engine.get(inst.id).version == inst.version


class TestCsrf:
    @pytest.fixture
    def app(self, saga_engine: SagaEngine) -> Flask:
        return make_app(saga_engine, WTF_CSRF_ENABLED=True)

    def _signed_in(self, app: Flask) -> FlaskClient:
        client = app.test_client()
        page = text(client.get("/login"))
        token = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', page)
        assert token is not None
        data = {"name": "operator", "password": PASSWORD, "csrf_token": token.group(1)}
        assert client.post("/login", data=data).status_code == 302
        return client

    def test_an_action_without_the_token_is_400_and_with_it_applies(
        self, app: Flask, saga_engine: SagaEngine
    ) -> None:
        client = self._signed_in(app)
        inst = dead_lettered(saga_engine)
        refused = post(client, inst, "resolve")
        assert refused.status_code == 400  # type: ignore[attr-defined]
        assert saga_engine.get(inst.id).version == inst.version

        page = text(client.get(f"/dead-letters/{inst.id}/resolve?version={inst.version}"))
        token = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', page)
        assert token is not None
        done = post(client, inst, "resolve", csrf_token=token.group(1))
        assert done.status_code == 302  # type: ignore[attr-defined]
        assert saga_engine.get(inst.id).state is SagaState.CANCELLED


class TestStuckTab:
    def _stuck(self, saga_engine: SagaEngine) -> Instance:
        # Started, never advanced (no worker): an hour later the sweep flags it.
        inst = saga_engine.start("order", {}, business_key="ORD-STUCK").instance
        later = saga_engine.clock() + 3_600_000
        assert saga_engine.sweeps(clock=lambda: later).stuck()["flagged"] == 1
        return inst

    def test_the_stuck_tab_counts_and_lists_flagged_instances(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._stuck(saga_engine)
        other = saga_engine.start("order", {}, business_key="ORD-NEW").instance

        tab = text(viewer.get("/sagas?state=stuck"))
        everything = text(viewer.get("/sagas"))

        assert re.search(r'tab-stuck active nonzero".*?<span class="count">1</span>', tab, re.S)
        assert inst.id in tab and other.id not in tab
        assert 'class="badge stuck"' in tab
        assert other.id in everything and "Stuck" in everything

    def test_the_stuck_tab_keeps_the_filters_and_refreshes_as_a_partial(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._stuck(saga_engine)
        partial = viewer.get("/sagas?state=stuck&saga=order", headers={"HX-Request": "true"})
        html = text(partial)
        assert html.lstrip().startswith('<div id="instances"') and inst.id in html
        assert "state=stuck&amp;saga=order" in html
        assert inst.id not in text(viewer.get("/sagas?state=stuck&saga=hostile"))

    def test_the_instance_page_shows_the_stuck_badge_until_it_progresses(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = self._stuck(saga_engine)
        page = text(operator.get(f"/sagas/{inst.id}"))
        assert 'id="stuck-badge"' in page and 'id="stuck"' in page

        saga_engine.operations.compensate(inst.id, actor="operator", reason="unstick")
        after = text(operator.get(f"/sagas/{inst.id}"))
        assert 'id="stuck-badge"' not in after
        assert saga_engine.get(inst.id).state is SagaState.COMPENSATED

    def test_a_bogus_state_is_still_400(self, viewer: FlaskClient) -> None:
        assert viewer.get("/sagas?state=stuckish").status_code == 400
