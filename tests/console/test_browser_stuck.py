"""A stuck saga in a real browser: flagged by the sweep, found in the stuck tab, compensated.

A step that hangs (its participant never answers) keeps its saga running
with no progress. The stuck sweep (:class:`engine.sweeper.passes.Sweeps`, the real
one, on the real clock) flags it; an operator finds it in the stuck tab,
sees the badge and how far off its step's usual duration it is, and
force-compensates it. The worker still waiting on the hung attempt gives
up at the step's timeout, finds the operator's change, and runs the
compensations: the live page turns ``compensated`` without a reload.
Screenshots go under ``artifacts/screenshots/``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from playwright.sync_api import expect

from console.serve import ConsoleServer
from engine import Retry, Saga, SagaEngine, SagaState, Settings, StepContext
from tests.console.console_sagas import SAGAS
from tests.console.support import PASSWORD, make_app
from tests.console.test_console_browser import _shot, browser

__all__ = ["browser"]  # the Chromium fixture, shared with the other browser tests

pytestmark = pytest.mark.browser

#: Set when a hanging attempt has started; the test waits for it.
ENTERED = threading.Event()
#: Never set while the test runs: the partner does not answer.
RELEASE = threading.Event()


def reserve(ctx: StepContext) -> dict[str, Any]:
    time.sleep(0.01 + 0.002 * (hash(ctx.saga_id) % 10))
    return {"slot": 1}


def unreserve(ctx: StepContext, output: Any) -> None:
    return None


def call_partner(ctx: StepContext) -> dict[str, Any]:
    if ctx.payload.get("hang"):
        ENTERED.set()
        RELEASE.wait(120)
    else:
        time.sleep(0.02 + 0.004 * (hash(ctx.saga_id) % 10))
    return {"answer": "ok"}


def forget_partner(ctx: StepContext, output: Any) -> None:
    return None


partner = Saga(
    "partner_call",
    # Each hung attempt times out after 8 s and is retried: the saga stays running
    # and makes no progress, which is what the stuck sweep is for.
    default_retry=Retry(max_attempts=50, initial_delay=timedelta(0)),
    default_timeout=timedelta(seconds=8),
    stuck_grace=timedelta(0),
)
partner.add_step("reserve", reserve, unreserve)
partner.add_step(
    "call_partner", call_partner, forget_partner, expected_duration=timedelta(milliseconds=300)
)


@pytest.fixture
def running(sqlite_url: str) -> Iterator[tuple[SagaEngine, str]]:
    ENTERED.clear()
    RELEASE.clear()
    eng = SagaEngine(
        [*SAGAS, partner],
        settings=Settings(database_url=sqlite_url, worker_id="test-worker", poll_seconds=0.05),
    )
    app = make_app(eng, WTF_CSRF_ENABLED=True)
    worker = eng.worker(concurrency=2).start()
    server = ConsoleServer(app).start()
    try:
        yield eng, server.url
    finally:
        RELEASE.set()  # let the hung step's thread end
        server.stop()
        worker.stop()
        eng.close()


def _flag_stuck(eng: SagaEngine) -> None:
    # The sweep's own rule, on the real clock: no progress for longer than the
    # step's expected 300 ms plus no grace. Running it again is harmless.
    eng.sweeps().stuck()


def test_a_hung_step_is_flagged_stuck_and_force_compensate_brings_it_to_compensated(
    browser: Any, running: tuple[SagaEngine, str]
) -> None:
    eng, url = running
    for n in range(20):  # earlier runs, for the step-duration charts
        eng.run("partner_call", {}, business_key=f"P-{n}")
    hung = eng.start("partner_call", {"hang": True}, business_key="P-HUNG").instance
    assert ENTERED.wait(20), "the hanging attempt never started"
    time.sleep(0.5)
    _flag_stuck(eng)
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    try:
        page.goto(f"{url}/sagas")
        page.fill("#name", "operator")
        page.fill("#password", PASSWORD)
        page.click("button:has-text('Sign in')")
        page.wait_for_url(f"{url}/sagas")

        _flag_stuck(eng)  # again, in case a timed-out attempt's save cleared it meanwhile
        page.click(".tab-stuck")
        page.wait_for_url(f"{url}/sagas?state=stuck")
        assert page.locator(".tab-stuck .count").inner_text() == "1"
        row = page.locator(f"tr:has(a[href='/sagas/{hung.id}'])")
        expect(row.locator(".badge.stuck")).to_be_visible()
        assert page.locator("#instances tbody tr").count() == 1
        _shot(page, "stuck-tab.png")

        _flag_stuck(eng)
        page.click(f"a[href='/sagas/{hung.id}']")
        page.wait_for_url(f"{url}/sagas/{hung.id}")
        expect(page.locator("#stuck-badge")).to_be_visible()
        assert page.locator("#instance-state").inner_text() == "running"
        assert "so far" in page.locator("li.step.current svg.chart").inner_html()
        _shot(page, "instance-stuck.png")

        page.click("#actions a:has-text('Force-compensate')")
        page.wait_for_url(f"{url}/sagas/{hung.id}/actions/compensate*")
        page.fill("#reason", "partner API hangs, order abandoned (INC-5120)")
        page.click("button:has-text('Confirm: Force-compensate')")
        page.wait_for_url(f"{url}/sagas/{hung.id}")

        # The worker gives up on the hung attempt at its timeout, then compensates.
        expect(page.locator("#instance-state")).to_have_text("compensated", timeout=40_000)
        assert page.locator("#stuck-badge").count() == 0
        assert "INC-5120" in page.locator("#operator-actions").inner_text()
        _shot(page, "instance-compensated-after-stuck.png")
    finally:
        context.close()
    done = eng.get(hung.id)
    assert done.state is SagaState.COMPENSATED
    assert [s.comp_status for s in done.steps] == ["compensated", "compensated"]
