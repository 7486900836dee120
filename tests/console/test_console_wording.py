"""What the pages say matches what happened: which side failed, what each action will do.

A half-compensated saga is the hard case: its last step failed, the
compensation of the step before it failed too (after its whole retry budget,
though the error was non-retryable), and the first step still waits to be
undone. Cancelling or resolving it by hand leaves both of those not
compensated; the confirmations say so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from engine import NO_RETRY, NonRetryableError, Retry, Saga, SagaEngine, SagaState, StepContext
from engine.model import Instance
from tests.console.console_sagas import SAGAS
from tests.console.support import PASSWORD, dead_lettered, make_app, make_engine, text

COMPENSATION_ATTEMPTS = 4


def book(ctx: StepContext) -> dict[str, Any]:
    return {"ok": True}


def unbook(ctx: StepContext, output: Any) -> None:
    return None


def hold(ctx: StepContext) -> dict[str, Any]:
    return {"held": True}


def release(ctx: StepContext, output: Any) -> None:
    if ctx.payload.get("stuck"):
        raise NonRetryableError("the bank refused to release the hold")


def pay(ctx: StepContext) -> None:
    raise NonRetryableError("card declined")


def unpay(ctx: StepContext, output: Any) -> None:
    return None


trip = Saga(
    "trip",
    default_retry=NO_RETRY,
    default_compensation_retry=Retry(
        max_attempts=COMPENSATION_ATTEMPTS, initial_delay=timedelta(0)
    ),
)
trip.add_step("book", book, unbook)
trip.add_step("hold", hold, release)
trip.add_step("pay", pay, unpay)


@pytest.fixture
def saga_engine(sqlite_url: str) -> Iterator[SagaEngine]:
    eng = SagaEngine([*SAGAS, trip], settings=make_engine(sqlite_url).settings)
    yield eng
    eng.close()


@pytest.fixture
def half(saga_engine: SagaEngine) -> Instance:
    """A trip whose compensation of ``hold`` gave up: ``hold`` and ``book`` are not undone."""
    inst = saga_engine.run("trip", {"stuck": True}, business_key="TRIP-HALF")
    assert inst.state is SagaState.FAILED
    assert inst.current.name == "hold"
    return inst


def _confirm(client: FlaskClient, inst: Instance, path: str) -> str:
    return text(client.get(f"{path}?version={inst.version}"))


class TestCancelAndResolve:
    def test_they_look_different_on_the_instance_page_and_the_queue(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        page = text(operator.get(f"/sagas/{inst.id}"))
        cancel = re.search(r'<a class="button ([a-z -]+)"[^>]*\n?[^>]*actions/cancel', page)
        resolve = re.search(r'<a class="button ([a-z -]+)"[^>]*\n?[^>]*/resolve', page)
        assert cancel is not None and resolve is not None
        assert cancel.group(1) == "danger"
        assert resolve.group(1) == "resolve"
        queue = text(operator.get("/dead-letters"))
        assert re.search(r'class="button small resolve"[^>]*\n?[^>]*/resolve', queue)

    def test_each_confirmation_explains_the_difference(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        cancel = _confirm(operator, inst, f"/sagas/{inst.id}/actions/cancel")
        resolve = _confirm(operator, inst, f"/dead-letters/{inst.id}/resolve")
        assert "Gives up on the saga" in cancel
        assert "use “Resolve by hand” instead" in cancel
        assert "Unlike “Cancel saga”, which gives the saga up as it stands" in resolve
        assert 'class="resolve">Confirm: Resolve by hand' in resolve
        assert 'class="danger">Confirm: Cancel saga' in cancel

    def test_on_a_half_compensated_saga_both_name_the_steps_left_not_compensated(
        self, operator: FlaskClient, half: Instance
    ) -> None:
        for path in (f"/sagas/{half.id}/actions/cancel", f"/dead-letters/{half.id}/resolve"):
            page = _confirm(operator, half, path)
            assert "half compensated: steps “hold”, “book” were not compensated and stay" in page, (
                path
            )

    def test_a_saga_that_compensated_nothing_yet_names_no_steps(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)  # failed forward, after its pivot
        assert "half compensated" not in _confirm(
            operator, inst, f"/sagas/{inst.id}/actions/cancel"
        )


class TestACompensationsDeadLetter:
    def test_says_the_compensation_was_retried_despite_a_non_retryable_error(
        self, operator: FlaskClient, half: Instance
    ) -> None:
        for page in (
            text(operator.get(f"/sagas/{half.id}")),
            _confirm(operator, half, f"/dead-letters/{half.id}/retry"),
        ):
            assert "NonRetryableError" in page
            assert (
                f"The compensation of step <b>hold</b> failed {COMPENSATION_ATTEMPTS} times" in page
            )
            assert "retried whatever the error, a\nnon-retryable one included" in page
            assert "gave up after" not in page

    def test_edit_and_retry_says_it_retries_the_compensation(
        self, operator: FlaskClient, half: Instance
    ) -> None:
        page = _confirm(operator, half, f"/dead-letters/{half.id}/edit-retry")
        assert "runs the compensation of step “hold” again" in page
        assert "runs step “hold” again" not in page

    def test_an_actions_dead_letter_still_says_the_step(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        page = _confirm(operator, inst, f"/dead-letters/{inst.id}/edit-retry")
        assert "runs step “ship” again" in page
        assert "The step <b>ship</b> gave up after 1 attempt" in page


class TestWhichSide:
    def test_the_failed_list_says_which_side_failed(
        self, viewer: FlaskClient, saga_engine: SagaEngine, half: Instance
    ) -> None:
        forward = dead_lettered(saga_engine)
        html = text(viewer.get("/sagas?state=failed"))
        rows = {
            i: html.split(f'href="/sagas/{i}"')[1].split("</tr>")[0] for i in (half.id, forward.id)
        }
        assert "compensation failed" in rows[half.id]
        assert "action failed" in rows[forward.id]

    def test_the_bulk_dry_run_says_which_side_failed(
        self, operator: FlaskClient, saga_engine: SagaEngine, half: Instance
    ) -> None:
        forward = dead_lettered(saga_engine)
        html = text(operator.get("/bulk/new?dry_run=1&action=retry&state=failed&rate=10"))
        sample = html.split('id="dry-run"')[1]
        rows = {
            i: sample.split(f'href="/sagas/{i}"')[1].split("</tr>")[0]
            for i in (half.id, forward.id)
        }
        assert 'class="side side-compensate">compensation<' in rows[half.id]
        assert 'class="side side-action">action<' in rows[forward.id]

    def test_a_compensated_sagas_current_step_is_its_compensation(
        self, viewer: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = saga_engine.run("trip", {}, business_key="TRIP-UNDONE")
        assert inst.state is SagaState.COMPENSATED
        page = text(viewer.get(f"/sagas/{inst.id}"))
        assert "step 1 of 3, compensation</span>" in page
        listed = text(viewer.get("/sagas?state=compensated"))
        assert "compensation</span>" in listed.split(f'href="/sagas/{inst.id}"')[1]


class TestBulkNote:
    @pytest.fixture
    def app(self, saga_engine: SagaEngine) -> Flask:
        return make_app(saga_engine)

    def _run(self, client: FlaskClient, app: Flask, count: int) -> str:
        form = {
            "action": "cancel",
            "saga": "order",
            "state": "failed",
            "rate": "1000",
            "batch_size": "10",
            "max_failure": "50",
            "time_field": "created",
        }
        query = "&".join(f"{k}={v}" for k, v in form.items())
        page = text(client.get(f"/bulk/new?dry_run=1&{query}"))
        assert f'id="dry-run-count">{count} ' in page
        token = re.search(r'name="snapshot" value="([^"]+)"', page)
        assert token is not None
        form.update(snapshot=token.group(1), reason="orders withdrawn (INC-9)")
        response = client.post("/bulk", data=form)
        assert response.status_code == 302, text(response)
        for thread in app.extensions["saga"].bulk.runner_threads:
            thread.join(30)
        return text(client.get(response.location))

    def test_a_fully_successful_run_shows_its_note_as_a_success(
        self, app: Flask, saga_engine: SagaEngine
    ) -> None:
        for n in range(2):
            dead_lettered(saga_engine, f"ORD-{n}")
        client = app.test_client()
        client.post("/login", data={"name": "operator", "password": PASSWORD})
        report = self._run(client, app, 2)
        assert 'id="bulk-status">completed<' in report
        assert '<p class="note ok" id="bulk-note">' in report
