"""Bulk recovery through the console: dry run, confirm, run in the background, watch, stop.

The dry run shows the count and a sample, changes no instance, and keeps
what it previewed as a snapshot; the confirmation acts on exactly that
snapshot, says how many more matched by then (not acted on) and offers a
dry run for them; a refused confirmation (400, 409) shows the form again
with everything typed in it; the operator role is needed for everything
that acts; the report follows every applied instance to its end, live (an
htmx partial that stops polling once the run is over and every instance has
an outcome); stop and resume work on an operation run by another process.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from engine import Action, SagaEngine, SagaState
from engine.bulk.model import BulkFilter, BulkStatus
from engine.queries import Queries
from engine.store import schema as t
from tests.console.console_sagas import SCRIPT
from tests.console.support import PASSWORD, dead_lettered, make_app, text
from tests.helpers.engines import wait_state

FAILED_ORDERS = "action=retry&saga=order&state=failed&rate=1000&batch_size=10&max_failure=50"


#: What a dry run keeps: the snapshot the confirmation acts on.
SNAPSHOTS = {"saga_bulk_snapshots", "saga_bulk_snapshot_items"}


def row_counts(saga_engine: SagaEngine, *, but: set[str] = SNAPSHOTS) -> dict[str, int]:
    with saga_engine.store.db.connect() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in t.metadata.sorted_tables
            if table.name not in but
        }


def dry_run(client: FlaskClient, query: str = FAILED_ORDERS) -> str:
    """The snapshot token of a dry run, as its confirmation form carries it."""
    found = re.search(
        r'name="snapshot" value="([^"]+)"', text(client.get(f"/bulk/new?dry_run=1&{query}"))
    )
    assert found is not None
    return found.group(1)


def start_form(snapshot: str, **changes: Any) -> dict[str, Any]:
    form = dict(re.findall(r"([a-z_]+)=([^&]+)", FAILED_ORDERS))
    form.update(snapshot=snapshot, reason="carrier is back (INC-9)", time_field="created")
    form.update(changes)
    return form


def finish(app: Flask) -> None:
    for thread in app.extensions["saga"].bulk.runner_threads:
        thread.join(30)
        assert not thread.is_alive()


def operation_id(location: str) -> str:
    return location.rsplit("/", 1)[1]


class TestDryRun:
    def test_shows_the_count_a_sample_and_the_confirmation_and_writes_nothing(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        ids = [dead_lettered(saga_engine, f"ORD-{n}").id for n in range(3)]
        saga_engine.run("order", {}, business_key="ORD-FINE")
        before = row_counts(saga_engine)

        response = operator.get(f"/bulk/new?dry_run=1&{FAILED_ORDERS}")

        html = text(response)
        assert response.status_code == 200
        assert row_counts(saga_engine) == before  # no instance, operation or audit entry
        assert re.search(r'id="dry-run-count">3 <span>instances match', html)
        assert all(i in html for i in ids) and "ORD-FINE" not in html
        assert "Confirm: Retry now on 3 instances" in html
        assert re.search(r'name="snapshot" value="[0-9a-f-]{36}"', html)
        assert row_counts(saga_engine, but=set())["saga_bulk_snapshot_items"] == 3
        assert "at most 1000 per second, in batches of 10" in html

    def test_the_form_alone_runs_nothing(self, operator: FlaskClient) -> None:
        html = text(operator.get("/bulk/new?action=cancel&state=failed"))
        assert 'id="dry-run"' not in html and 'value="cancel" selected' in html

    def test_nothing_matching_offers_no_confirmation(self, operator: FlaskClient) -> None:
        html = text(operator.get(f"/bulk/new?dry_run=1&{FAILED_ORDERS}"))
        assert "Nothing to do" in html and "Confirm:" not in html

    @pytest.mark.parametrize(
        ("query", "problem"),
        [
            ("action=explode&state=failed", "not one of retry"),
            ("action=retry", "choose at least one"),
            ("action=retry&state=failed&rate=abc", "not a number"),
            ("action=retry&state=failed&batch_size=0", "whole number from 1"),
            ("action=retry&state=failed&max_failure=150", "from 0 to 100"),
            ("action=retry&state=sideways", "not one of running"),
            ("action=retry&state=failed&from=2026-13-01", "not a time"),
        ],
    )
    def test_malformed_input_is_400_with_what_was_wrong(
        self, operator: FlaskClient, query: str, problem: str
    ) -> None:
        response = operator.get(f"/bulk/new?dry_run=1&{query}")
        assert response.status_code == 400
        assert problem in text(response).replace("&#39;", "'")

    def test_untrusted_error_text_in_the_sample_renders_inert(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        saga_engine.run("hostile", {}, business_key="H-1")
        html = text(operator.get("/bulk/new?dry_run=1&action=retry&state=failed&error=owned"))
        assert SCRIPT not in html and "&lt;script&gt;" in html
        assert "Confirm: Retry now on 1 instance<" in html


class TestRunning:
    def test_confirming_runs_it_and_the_report_and_audit_log_have_every_item(
        self, operator: FlaskClient, app: Flask, saga_engine: SagaEngine
    ) -> None:
        ids = [dead_lettered(saga_engine, f"ORD-{n}").id for n in range(3)]

        response = operator.post("/bulk", data=start_form(dry_run(operator)))

        assert response.status_code == 302
        finish(app)
        op_id = operation_id(response.location)
        report = text(operator.get(response.location))
        assert "Bulk retry now started on 3 instance(s)" in report
        assert 'id="bulk-status">completed<' in report
        assert re.search(r'<b id="bulk-processed">3</b> of 3 processed', report)
        assert report.count("badge item item-applied") == 3
        for saga_id in ids:
            assert saga_id in report
            (entry,) = Queries(saga_engine.store).operator_actions(saga_id=saga_id)
            assert (entry.actor, entry.action) == ("operator", "retry")
            assert entry.detail == {"bulk_operation": op_id}
            assert (entry.origin, entry.origin_detail) == ("console", "operator")
        assert op_id in text(operator.get("/bulk"))

    def test_a_confirmation_acts_on_the_previewed_ones_while_more_arrive(
        self, operator: FlaskClient, app: Flask, saga_engine: SagaEngine
    ) -> None:
        previewed = [dead_lettered(saga_engine, f"ORD-{n}").id for n in range(2)]
        token = dry_run(operator)
        later = dead_lettered(saga_engine, "ORD-LATE").id  # arrives before the click

        response = operator.post("/bulk", data=start_form(token))

        assert response.status_code == 302
        finish(app)
        op_id = operation_id(response.location)
        items = saga_engine.bulk_recovery().store.items(op_id).items
        assert [i.saga_id for i in items] == previewed
        assert saga_engine.get(later).state is SagaState.FAILED  # left alone
        report = text(operator.get(response.location))
        assert re.search(r'id="bulk-more">1 more instance matched', report)
        link = re.search(r'href="(/bulk/new\?[^"]+)">Dry run for those', report)
        assert link is not None
        again = text(operator.get(link.group(1).replace("&amp;", "&")))
        assert later in again and not any(i in again for i in previewed)
        assert re.search(r'id="dry-run-count">1 <span>instance match', again)

    def test_a_used_or_expired_dry_run_is_409_and_keeps_what_was_typed(
        self, operator: FlaskClient, app: Flask, saga_engine: SagaEngine
    ) -> None:
        dead_lettered(saga_engine, "ORD-1")
        token = dry_run(operator)
        typed = {"reason": "carrier <back> (INC-9)", "batch_size": "7", "rate": "2.5"}
        assert operator.post("/bulk", data=start_form(token, **typed)).status_code == 302
        finish(app)
        dead_lettered(saga_engine, "ORD-2")
        before = row_counts(saga_engine)

        again = operator.post("/bulk", data=start_form(token, max_failure="35", **typed))

        html = text(again)
        assert again.status_code == 409
        assert row_counts(saga_engine) == before
        assert "older than an hour or was confirmed already" in html
        assert ">carrier &lt;back&gt; (INC-9)</textarea>" in html
        for name, value in (("batch_size", "7"), ("rate", "2.5"), ("max_failure", "35")):
            assert re.search(f'name="{name}"[^>]*value="{value}"', html), name
        fresh = re.search(r'name="snapshot" value="([^"]+)"', html)
        assert fresh is not None and fresh.group(1) != token  # a new dry run to confirm
        assert re.search(r'id="dry-run-count">1 <span>instance match', html)

    def test_a_missing_reason_is_400_and_shows_the_dry_run_again(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        dead_lettered(saga_engine)
        token = dry_run(operator)
        response = operator.post("/bulk", data=start_form(token, reason=" ", batch_size="3"))
        assert response.status_code == 400
        assert "say why you are doing this" in text(response)
        assert "Confirm: Retry now on 1 instance" in text(response)
        assert 'name="batch_size" value="3"' in text(response)

    def test_bad_numbers_are_400_and_keep_the_reason(self, operator: FlaskClient) -> None:
        response = operator.post(
            "/bulk", data=start_form("x", rate="fast", reason="carrier is back (INC-9)")
        )
        html = text(response)
        assert response.status_code == 400
        assert "not a number" in html.replace("&#39;", "'")
        assert 'name="reason" value="carrier is back (INC-9)"' in html  # carried by the form
        assert 'name="rate" min="0.1" max="1000" step="0.1" value="fast"' in html

    def test_a_tampered_snapshot_is_refused(self, operator: FlaskClient) -> None:
        assert operator.post("/bulk", data=start_form("lots")).status_code == 409
        assert operator.post("/bulk", data=start_form("x" * 40)).status_code == 400

    def test_the_progress_partial_polls_while_running_and_stops_when_done(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        dead_lettered(saga_engine)
        bulk = saga_engine.bulk_recovery()
        flt = BulkFilter(state=SagaState.FAILED)
        op = bulk.create(Action.CANCEL, flt, actor="operator", reason="r", expected_count=1)
        htmx = {"HX-Request": "true"}

        running = text(operator.get(f"/bulk/{op.id}", headers=htmx))
        bulk.runner(sleep=lambda s: None).run(op.id)
        done = text(operator.get(f"/bulk/{op.id}", headers=htmx))

        assert running.lstrip().startswith('<section class="card" id="bulk-progress"')
        assert "<html" not in running
        assert 'hx-trigger="every 2s"' in running and "Stop now" in running
        assert "hx-trigger" not in done and 'id="bulk-status">completed<' in done
        assert "1 cancelled" in done and 'id="bulk-settled"' in done

    def test_the_partial_polls_after_the_run_until_every_instance_has_ended(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        ids = [dead_lettered(saga_engine, f"ORD-{n}").id for n in range(2)]
        bulk = saga_engine.bulk_recovery()
        flt = BulkFilter(state=SagaState.FAILED)
        op = bulk.create(Action.RETRY, flt, actor="operator", reason="r", expected_count=2)
        htmx = {"HX-Request": "true"}
        bulk.runner(sleep=lambda s: None).run(op.id)  # no worker yet: both still running

        following = text(operator.get(f"/bulk/{op.id}", headers=htmx))
        worker = saga_engine.worker(1).start()
        try:
            for saga_id in ids:
                wait_state(saga_engine, saga_id, SagaState.COMPLETED)
        finally:
            worker.stop(timeout=30)
        ended = text(operator.get(f"/bulk/{op.id}", headers=htmx))

        assert 'id="bulk-status">completed<' in following  # the run is over ...
        assert 'id="bulk-still-running">2 still running' in following
        assert 'hx-trigger="every 2s"' in following  # ... but its instances are not
        assert "2 completed" in ended and 'id="bulk-still-running">0 still running' in ended
        assert "hx-trigger" not in ended

    def test_the_report_filters_by_outcome_and_pages(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        first = dead_lettered(saga_engine, "ORD-1")
        moved = dead_lettered(saga_engine, "ORD-2")
        bulk = saga_engine.bulk_recovery()
        flt = BulkFilter(state=SagaState.FAILED)
        op = bulk.create(Action.CANCEL, flt, actor="operator", reason="r", expected_count=2)
        saga_engine.operations.skip(moved.id, actor="colleague", reason="by hand")
        bulk.runner(sleep=lambda s: None).run(op.id)

        skipped = text(viewer.get(f"/bulk/{op.id}?outcome=skipped"))

        assert moved.id in skipped and first.id not in skipped
        assert "changed since you read it" in skipped
        assert viewer.get(f"/bulk/{op.id}?outcome=weird").status_code == 400
        assert viewer.get(f"/bulk/{op.id}?after=x").status_code == 400
        assert viewer.get("/bulk/no-such-operation").status_code == 404


class TestStopAndResume:
    def _created(self, saga_engine: SagaEngine, n: int = 2) -> Any:
        for i in range(n):
            dead_lettered(saga_engine, f"ORD-{i}")
        flt = BulkFilter(state=SagaState.FAILED)
        return saga_engine.bulk_recovery().create(
            Action.CANCEL, flt, actor="someone", reason="r", expected_count=n
        )

    def test_stop_from_this_console_is_obeyed_by_a_runner_elsewhere(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        op = self._created(saga_engine)
        bulk = saga_engine.bulk_recovery()
        assert bulk.store.claim(op.id, "other-host:bulk", saga_engine.clock())

        response = operator.post(f"/bulk/{op.id}/stop")

        assert response.status_code == 302
        page = text(operator.get(response.location))
        assert "stops before its next instance" in page and "stopping…" in page
        assert "Stop requested by operator" in page
        bulk.store.release(op.id, "other-host:bulk", "")  # that runner went away ...
        done = bulk.runner(sleep=lambda s: None).run(op.id)  # ... and a new one sees the flag
        assert done.status is BulkStatus.STOPPED and done.processed == 0

    def test_stopping_an_ended_operation_is_409(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        op = self._created(saga_engine)
        saga_engine.bulk_recovery().run(op.id)
        assert operator.post(f"/bulk/{op.id}/stop").status_code == 409

    def test_an_interrupted_operation_shows_resume_and_resumes_here(
        self, operator: FlaskClient, app: Flask, saga_engine: SagaEngine
    ) -> None:
        op = self._created(saga_engine)
        bulk = saga_engine.bulk_recovery()
        assert bulk.store.claim(op.id, "dead-host:bulk", saga_engine.clock())
        bulk.store.release(op.id, "dead-host:bulk", "the runner failed: store went away")

        page = text(operator.get(f"/bulk/{op.id}"))
        assert "interrupted" in page and "Resume" in page
        assert "the runner failed: store went away" in page
        response = operator.post(f"/bulk/{op.id}/resume")

        assert response.status_code == 302
        finish(app)
        assert bulk.get(op.id).status is BulkStatus.COMPLETED

    def test_resuming_a_live_operation_is_409(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        op = self._created(saga_engine)
        assert saga_engine.bulk_recovery().store.claim(op.id, "live:bulk", saga_engine.clock())
        assert operator.post(f"/bulk/{op.id}/resume").status_code == 409


class TestRoles:
    def test_a_viewer_reads_reports_but_cannot_start_stop_or_resume(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        dead_lettered(saga_engine)
        flt = BulkFilter(state=SagaState.FAILED)
        op = saga_engine.bulk_recovery().create(
            Action.CANCEL, flt, actor="someone", reason="r", expected_count=1
        )
        before = row_counts(saga_engine)

        assert viewer.get("/bulk").status_code == 200
        assert viewer.get(f"/bulk/{op.id}").status_code == 200
        assert "New bulk recovery" not in text(viewer.get("/bulk"))
        assert "Stop now" not in text(viewer.get(f"/bulk/{op.id}"))
        assert viewer.get(f"/bulk/new?dry_run=1&{FAILED_ORDERS}").status_code == 403
        assert viewer.post("/bulk", data=start_form("t")).status_code == 403
        assert viewer.post(f"/bulk/{op.id}/stop").status_code == 403
        assert viewer.post(f"/bulk/{op.id}/resume").status_code == 403
        assert row_counts(saga_engine) == before

    def test_an_admin_may_do_what_an_operator_may(
        self, admin: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        dead_lettered(saga_engine)
        assert admin.get(f"/bulk/new?dry_run=1&{FAILED_ORDERS}").status_code == 200
        assert admin.get("/dead-letters").status_code == 200
        assert "Resolve by hand" in text(admin.get("/dead-letters"))

    def test_signed_out_is_sent_to_sign_in(self, anon: FlaskClient) -> None:
        for path in ("/bulk", "/bulk/new"):
            response = anon.get(path)
            assert response.status_code == 302 and "/login" in response.location


class TestCsrf:
    @pytest.fixture
    def app(self, saga_engine: SagaEngine) -> Flask:
        return make_app(saga_engine, WTF_CSRF_ENABLED=True)

    def test_start_and_stop_need_the_token(self, app: Flask, saga_engine: SagaEngine) -> None:
        client = app.test_client()
        login = text(client.get("/login"))
        token = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', login)
        assert token is not None
        data = {"name": "operator", "password": PASSWORD, "csrf_token": token.group(1)}
        client.post("/login", data=data)
        dead_lettered(saga_engine)
        before = row_counts(saga_engine)

        page = text(client.get(f"/bulk/new?dry_run=1&{FAILED_ORDERS}"))
        token = re.search(r'name="csrf_token" value="([^"]+)"', page)
        snapshot = re.search(r'name="snapshot" value="([^"]+)"', page)
        assert token is not None and snapshot is not None
        assert client.post("/bulk", data=start_form(snapshot.group(1))).status_code == 400
        assert row_counts(saga_engine) == before

        form = start_form(snapshot.group(1), csrf_token=token.group(1))
        started = client.post("/bulk", data=form)
        assert started.status_code == 302
        op_id = operation_id(started.location)
        assert client.post(f"/bulk/{op_id}/stop").status_code == 400
        finish(app)
