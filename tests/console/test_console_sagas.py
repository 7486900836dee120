"""The instance list, the search box and the instance page, through the Flask test client."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from engine import IdempotencyGuard, SagaEngine, SagaState
from tests.console.support import dead_lettered, make_app, make_engine, sign_in, text


def _ids_in_order(html: str) -> list[str]:
    return re.findall(r'href="/sagas/([0-9a-f-]{36})"', html)


def _start_many(saga_engine: SagaEngine, count: int) -> list[str]:
    """Start ``count`` orders; their ids newest first, as the list orders them."""
    started = [saga_engine.start("order", {"n": n}).instance for n in range(count)]
    started.sort(key=lambda i: (i.created_at, i.id), reverse=True)
    return [i.id for i in started]


class TestList:
    def test_rows_show_what_an_operator_scans_for(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine, "ORD-7")
        html = text(viewer.get("/sagas"))
        for shown in (
            inst.id,
            "order",
            "ORD-7",
            inst.correlation_id,
            "failed · dead-lettered",
            "ship",
            "3/3",
            "ago",
        ):
            assert shown in html

    def test_newest_first(self, viewer: FlaskClient, saga_engine: SagaEngine) -> None:
        ids = _start_many(saga_engine, 3)
        assert _ids_in_order(text(viewer.get("/sagas"))) == ids

    def test_tabs_count_each_state_and_filter_by_it(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        failed = dead_lettered(saga_engine)
        running = saga_engine.start("order", {}).id
        done = saga_engine.run("order", {}).id
        html = text(viewer.get("/sagas"))
        assert re.search(r"All\s*<span class=\"count\">3</span>", html)
        assert re.search(r"Failed · dead-lettered\s*<span class=\"count\">1</span>", html)
        assert re.search(r"Completed\s*<span class=\"count\">1</span>", html)
        assert _ids_in_order(text(viewer.get("/sagas?state=failed"))) == [failed.id]
        assert _ids_in_order(text(viewer.get("/sagas?state=running"))) == [running]
        assert _ids_in_order(text(viewer.get("/sagas?state=completed"))) == [done]

    def test_counts_stop_at_the_cap(self, saga_engine: SagaEngine) -> None:
        client = sign_in(make_app(saga_engine, SAGA_COUNT_CAP=2).test_client(), "viewer")
        for _ in range(3):
            saga_engine.start("order", {})
        saga_engine.start("hostile", {})
        html = text(client.get("/sagas"))
        assert re.search(r"All\s*<span class=\"count\">2\+</span>", html)
        assert re.search(r"Running\s*<span class=\"count\">2\+</span>", html)
        filtered = text(client.get("/sagas?saga=hostile"))
        assert re.search(r"Running\s*<span class=\"count\">1</span>", filtered)

    def test_filter_by_saga_type_and_time_range(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        order = saga_engine.start("order", {}).id
        hostile = saga_engine.start("hostile", {}).id
        assert _ids_in_order(text(viewer.get("/sagas?saga=hostile"))) == [hostile]
        since_2000 = _ids_in_order(text(viewer.get("/sagas?from=2000-01-01T00:00")))
        assert sorted(since_2000) == sorted([hostile, order])
        assert _ids_in_order(text(viewer.get("/sagas?to=2000-01-01"))) == []

    def test_pages_with_a_cursor_keeping_the_filters(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        ids = _start_many(saga_engine, 53)
        first = text(viewer.get("/sagas?saga=order"))
        assert _ids_in_order(first) == ids[:50]
        older = re.search(r'href="(/sagas\?[^"]*cursor=[^"]+)">Older', first)
        assert older is not None
        link = older.group(1).replace("&amp;", "&")
        assert "saga=order" in link
        second = text(viewer.get(link))
        assert _ids_in_order(second) == ids[50:]
        assert "Older »" not in second

    @pytest.mark.parametrize(
        "query",
        [
            "state=bogus",
            "from=yesterday",
            "to=2026-13-01",
            "from=2026-02-01&to=2026-01-01",
            "cursor=garbage",
            # Digits past a bigint (and past Python's int() limit) are refused, not sent on.
            "cursor=99999999999999999999999_01a24567-a2aa-7290-99c1-afefaa142f23",
            "cursor=" + "9" * 5000 + "_x",
            "cursor=%C2%B2_x",
            "saga=" + "x" * 101,
        ],
    )
    def test_malformed_filters_are_a_bad_request(self, viewer: FlaskClient, query: str) -> None:
        response = viewer.get(f"/sagas?{query}")
        assert response.status_code == 400
        assert "invalid" in text(response)
        assert "Nothing was changed" in text(response)

    def test_htmx_gets_the_table_partial_that_keeps_polling_with_the_filters(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        saga_engine.start("order", {})
        response = viewer.get("/sagas?state=running&saga=order", headers={"HX-Request": "true"})
        html = text(response).strip()
        assert html.startswith('<div id="instances"')
        assert "<html" not in html
        assert 'hx-trigger="every 5s"' in html
        hx_get = re.search(r'hx-get="([^"]+)"', html)
        assert hx_get is not None
        assert "state=running" in hx_get.group(1) and "saga=order" in hx_get.group(1)

    def test_the_full_page_wraps_the_same_partial(self, viewer: FlaskClient) -> None:
        html = text(viewer.get("/sagas"))
        assert "<html" in html and 'id="instances"' in html


class TestOnBothBackends:
    """The list's counts, filters and search run on SQLite and PostgreSQL alike."""

    @pytest.fixture
    def saga_engine(self, store_url: str) -> Iterator[SagaEngine]:
        eng = make_engine(store_url)
        yield eng
        eng.close()

    def test_tabs_filters_and_search(self, viewer: FlaskClient, saga_engine: SagaEngine) -> None:
        failed = dead_lettered(saga_engine, "ORD-77")
        saga_engine.start("order", {})
        saga_engine.start("hostile", {})
        html = text(viewer.get("/sagas?saga=order"))
        assert re.search(r"All\s*<span class=\"count\">2</span>", html)
        assert re.search(r"Running\s*<span class=\"count\">1</span>", html)
        assert _ids_in_order(text(viewer.get("/sagas?state=failed&saga=order"))) == [failed.id]
        assert _ids_in_order(text(viewer.get(f"/search?q={failed.correlation_id}")))[0] == (
            failed.id
        )
        assert "Dead-lettered" in text(viewer.get(f"/sagas/{failed.id}"))


class TestSearch:
    @pytest.mark.parametrize("field", ["id", "correlation_id", "business_key"])
    def test_finds_an_instance_by_any_of_its_keys(
        self, viewer: FlaskClient, saga_engine: SagaEngine, field: str
    ) -> None:
        inst = dead_lettered(saga_engine, "ORD-42")
        saga_engine.start("order", {}, business_key="ORD-43")
        html = text(viewer.get(f"/search?q={getattr(inst, field)}"))
        assert _ids_in_order(html)[0] == inst.id
        assert "ORD-43" not in html

    def test_shows_dead_letters_and_operator_actions(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine, "ORD-9")
        saga_engine.operations.cancel(inst.id, actor="carol", reason="customer called")
        html = text(viewer.get("/search?q=ORD-9"))
        dead = html.split('id="search-dead-letters"')[1]
        assert "carrier rejected parcel for ORD-9" in dead
        actions = html.split('id="search-actions"')[1]
        assert "carol" in actions and "customer called" in actions

    def test_no_match_says_so(self, viewer: FlaskClient) -> None:
        assert "Nothing has this saga id" in text(viewer.get("/search?q=nothing"))

    def test_empty_search_shows_the_box(self, viewer: FlaskClient) -> None:
        response = viewer.get("/search")
        assert response.status_code == 200
        assert "Paste a saga id" in text(response)

    def test_an_overlong_search_is_a_bad_request(self, viewer: FlaskClient) -> None:
        assert viewer.get("/search?q=" + "x" * 201).status_code == 400


class TestInstancePage:
    def test_shows_steps_attempts_errors_and_keys(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine, "ORD-5")
        html = text(viewer.get(f"/sagas/{inst.id}"))
        steps = html.split('id="steps"')[1].split("</section>")[0]
        for name in ("reserve", "charge", "ship"):
            assert f'<span class="step-name">{name}</span>' in steps
        assert "action: succeeded" in steps and "action: failed" in steps
        assert "compensation: not needed" in steps
        assert "carrier rejected parcel for ORD-5" in steps
        assert "Traceback" in steps and "NonRetryableError" in steps
        assert f"{inst.id}:ship:action" in steps and f"{inst.id}:reserve:compensate" in steps
        assert "pivot" in steps

    def test_shows_the_dead_letter_payload_outputs_and_event_log(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine, "ORD-6", customer="c-1")
        html = text(viewer.get(f"/sagas/{inst.id}"))
        assert "Dead-lettered: this saga waits for an operator" in html
        payload = html.split('id="payload"')[1].split("</section>")[0]
        assert "&#34;customer&#34;: &#34;c-1&#34;" in payload
        assert "R-ORD-6" in html.split('id="outputs"')[1]
        events = html.split('id="events"')[1]
        for kind in ("saga started", "attempt failed", "dead lettered"):
            assert kind in events
        assert inst.correlation_id in events

    def test_counts_duplicate_deliveries_the_guard_absorbed(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = saga_engine.run("order", {})
        guard = IdempotencyGuard(saga_engine.store.db, "carrier")
        key = f"{inst.id}:ship:action"
        for _ in range(3):
            guard.run_once(key, lambda conn: "shipped")
        html = text(viewer.get(f"/sagas/{inst.id}"))
        assert "2 duplicates absorbed" in html

    def test_polls_while_not_final(self, viewer: FlaskClient, saga_engine: SagaEngine) -> None:
        inst = dead_lettered(saga_engine)
        html = text(viewer.get(f"/sagas/{inst.id}"))
        assert 'hx-trigger="every 2s"' in html
        assert f"/sagas/{inst.id}?v={inst.version}" in html

    def test_stops_polling_when_final(self, viewer: FlaskClient, saga_engine: SagaEngine) -> None:
        inst = saga_engine.run("order", {})
        assert inst.state is SagaState.COMPLETED
        html = text(viewer.get(f"/sagas/{inst.id}"))
        assert "hx-trigger" not in html
        assert "no longer refreshing" in html

    def test_htmx_gets_the_partial_and_204_when_nothing_changed(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        hx = {"HX-Request": "true"}
        partial = text(viewer.get(f"/sagas/{inst.id}", headers=hx)).strip()
        assert partial.startswith('<div id="instance"') and "<html" not in partial
        assert viewer.get(f"/sagas/{inst.id}?v={inst.version}", headers=hx).status_code == 204
        stale = viewer.get(f"/sagas/{inst.id}?v={inst.version - 1}", headers=hx)
        assert stale.status_code == 200

    def test_an_unknown_id_is_404_with_a_page_that_says_so(self, viewer: FlaskClient) -> None:
        response = viewer.get("/sagas/no-such-id")
        assert response.status_code == 404
        assert "No saga instance has the id" in text(response)

    def test_an_unknown_path_is_404(self, viewer: FlaskClient) -> None:
        assert viewer.get("/nowhere").status_code == 404

    def test_viewers_see_no_action_buttons(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        html = text(viewer.get(f"/sagas/{inst.id}"))
        assert "/actions/" not in html
        assert "You are signed in as a viewer" in html

    def test_operators_see_only_the_actions_the_state_allows(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)  # past the pivot: no force-compensate
        html = text(operator.get(f"/sagas/{inst.id}"))
        for allowed in ("retry", "skip", "cancel"):
            assert f"/sagas/{inst.id}/actions/{allowed}?version={inst.version}" in html
        assert "/actions/compensate" not in html
        done = saga_engine.run("order", {})
        assert "/actions/" not in text(operator.get(f"/sagas/{done.id}"))

    def test_the_root_goes_to_the_list(self, viewer: FlaskClient) -> None:
        assert viewer.get("/").location == "/sagas"
