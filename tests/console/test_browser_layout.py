"""The instance page's layout in a real browser, at the widths on-call screens have.

An opened traceback with a long line, and an error message with a long unbroken
token, must stay inside their step card, and the step's duration chart must not
cover the attempts table (its error column above all), at 1440 and 1920 pixels
wide. The pages ask for no file that is not there (the favicon among them), and
"Cancel saga" and "Resolve by hand" do not look alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from console.serve import ConsoleServer
from engine import NO_RETRY, NonRetryableError, Saga, SagaEngine, SagaState, StepContext
from tests.console.console_sagas import SAGAS
from tests.console.support import PASSWORD, dead_lettered, make_app, make_engine
from tests.console.test_console_browser import _shot, browser

__all__ = ["browser"]  # the Chromium fixture, shared with the other browser tests

pytestmark = pytest.mark.browser

#: An error with no place to break a line: the kind a participant's message can be.
TOKEN = "X" * 400


def _deeper(depth: int, ctx: StepContext) -> None:
    if depth == 0:
        raise NonRetryableError(f"carrier said: {TOKEN} for {ctx.business_key}")
    _deeper(depth - 1, ctx)


def collect(ctx: StepContext) -> dict[str, Any]:
    if ctx.payload.get("fail"):
        _deeper(4, ctx)
    return {"collected": True}


def uncollect(ctx: StepContext, output: Any) -> None:
    return None


def deliver(ctx: StepContext) -> dict[str, Any]:
    return {"delivered": True}


def undeliver(ctx: StepContext, output: Any) -> None:
    return None


parcel = Saga("parcel", default_retry=NO_RETRY, default_compensation_retry=NO_RETRY)
parcel.add_step("deliver", deliver, undeliver)
parcel.add_step("collect", collect, uncollect)


@pytest.fixture
def served(sqlite_url: str) -> Iterator[tuple[SagaEngine, str]]:
    eng = SagaEngine([*SAGAS, parcel], settings=make_engine(sqlite_url).settings)
    app = make_app(eng, WTF_CSRF_ENABLED=True)
    server = ConsoleServer(app).start()
    try:
        yield eng, server.url
    finally:
        server.stop()
        eng.close()


def _sign_in(page: Any, url: str, name: str) -> None:
    page.goto(f"{url}/login")
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{url}/sagas")


#: The boxes the assertions compare, read in one go from the page.
_BOXES = """() => {
  const box = (el) => { const r = el.getBoundingClientRect();
    return {left: r.left, right: r.right, top: r.top, bottom: r.bottom}; };
  return [...document.querySelectorAll('#steps li.step')].map((step) => ({
    step: box(step),
    main: box(step.querySelector('.step-main')),
    chart: step.querySelector('figure.step-chart') && box(step.querySelector('figure.step-chart')),
    table: step.querySelector('table.attempts') && box(step.querySelector('table.attempts')),
    cells: [...step.querySelectorAll('table.attempts td')].map(box),
    tracebacks: [...step.querySelectorAll('pre.traceback')].map(box),
  })).concat([{steps: box(document.querySelector('#steps')),
               events: box(document.querySelector('#events')),
               eventsTable: box(document.querySelector('#events table'))}]);
}"""


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return (
        a["left"] < b["right"] - 0.5
        and b["left"] < a["right"] - 0.5
        and a["top"] < b["bottom"] - 0.5
        and b["top"] < a["bottom"] - 0.5
    )


@pytest.mark.parametrize("width", [1440, 1920])
def test_an_opened_traceback_stays_in_its_card_and_clear_of_the_chart(
    browser: Any, served: tuple[SagaEngine, str], width: int
) -> None:
    eng, url = served
    for n in range(4):  # recent runs, so the failing step has a chart beside it
        eng.run("parcel", {}, business_key=f"P-{n}")
    failed = eng.run("parcel", {"fail": True}, business_key="P-LONG")
    assert failed.state is SagaState.COMPENSATED
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    try:
        _sign_in(page, url, "viewer")
        page.goto(f"{url}/sagas/{failed.id}")
        for summary in page.locator("#steps details summary").all():
            summary.click()
        assert page.locator("#steps pre.traceback").first.is_visible()
        _shot(page, f"instance-traceback-{width}.png")
        *steps, log = page.evaluate(_BOXES)
        for s in steps:
            assert s["step"]["right"] <= log["steps"]["right"], (s["step"], log["steps"])
            assert s["table"]["right"] <= s["main"]["right"] + 0.5, s
            for tb in s["tracebacks"]:
                assert tb["right"] <= s["table"]["right"] + 0.5, (tb, s["table"])
                assert tb["right"] <= s["step"]["right"], (tb, s["step"])
            if s["chart"]:
                assert not any(_overlap(cell, s["chart"]) for cell in s["cells"]), s
        assert log["eventsTable"]["right"] <= log["events"]["right"] + 0.5, log
    finally:
        context.close()


def test_pages_ask_for_nothing_that_is_missing(
    browser: Any, served: tuple[SagaEngine, str]
) -> None:
    eng, url = served
    inst = dead_lettered(eng)
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    missing: list[str] = []
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    try:
        _sign_in(page, url, "operator")
        page.goto(f"{url}/sagas/{inst.id}")
        icon = page.evaluate("document.querySelector('link[rel=icon]').href")
        assert page.request.get(icon).status == 200
        assert page.request.get(f"{url}/favicon.ico", max_redirects=2).status == 200

        cancel = page.locator("#actions a:has-text('Cancel saga')")
        resolve = page.locator("#actions a:has-text('Resolve by hand')")
        style = "(el) => { const s = getComputedStyle(el); return [s.backgroundColor, s.color]; }"
        assert cancel.evaluate(style) != resolve.evaluate(style)
        assert resolve.evaluate(style)[0] != "rgb(179, 38, 30)"  # not the red of --failed
        _shot(page, "instance-cancel-and-resolve.png")
        assert missing == []
    finally:
        context.close()
