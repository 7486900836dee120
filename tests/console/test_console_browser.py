"""The console in a real browser: Playwright driving Debian's Chromium.

The console runs on a free 127.0.0.1 port in a thread, next to a worker
thread, on a SQLite store. The main test is the on-call path: sign in, find
a dead-lettered saga by its business key, retry it with a reason, and watch
the live page turn ``completed`` without a reload. It saves screenshots of
the pages under ``artifacts/screenshots/`` (``make screenshots``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect, sync_playwright

from console import HTMX
from console.serve import ConsoleServer
from engine import SagaEngine, SagaState
from engine.bulk.model import SNAPSHOT_TTL_MS
from engine.store.bulk import BulkStore
from tests.console.console_sagas import FAILING, SAGAS, SCRIPT, SLOW
from tests.console.support import PASSWORD, make_app, make_engine

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("SAGA_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = Path(
    os.environ.get(
        "SAGA_SCREENSHOTS_DIR", Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
    )
)
KEY = "ORD-20931"


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI needs it, so this is a failure, not a skip", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not shutil.which(CHROMIUM):
        _missing(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    if not HTMX.is_file():
        _missing(f"{HTMX} is missing: run `make setup` (npm ci, then the copy)")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield launched
        launched.close()


@pytest.fixture
def running(sqlite_url: str) -> Iterator[tuple[SagaEngine, str]]:
    """A console at a URL, with a worker advancing the sagas behind it."""
    eng = make_engine(sqlite_url)
    app = make_app(eng, WTF_CSRF_ENABLED=True)
    worker = eng.worker(concurrency=2).start()
    server = ConsoleServer(app).start()
    try:
        yield eng, server.url
    finally:
        server.stop()
        worker.stop()
        eng.close()


def _seed(eng: SagaEngine) -> str:
    for n in range(6):
        eng.run("order", {"amount": 10 * n, "customer": f"c-{n}"}, business_key=f"ORD-2090{n}")
    eng.run("hostile", {"note": SCRIPT}, business_key="H-7")
    FAILING.add(KEY)
    try:
        failed = eng.run("order", {"amount": 129, "customer": "c-88"}, business_key=KEY)
    finally:
        FAILING.discard(KEY)
    assert failed.state is SagaState.FAILED
    return failed.id


def _sign_in(page: Any, url: str, name: str) -> None:
    page.goto(f"{url}/sagas")
    assert "/login" in page.url
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{url}/sagas")


def _shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=True)


def test_find_a_dead_lettered_saga_retry_it_and_watch_it_complete(
    browser: Any, running: tuple[SagaEngine, str]
) -> None:
    eng, url = running
    saga_id = _seed(eng)
    SLOW[KEY] = 3.0  # the retried step takes a while: the page shows it running, then done
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    blocked: list[str] = []
    page.on(
        "console",
        lambda msg: blocked.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    try:
        _sign_in(page, url, "operator")
        assert page.locator(".tab-failed .count").inner_text() == "2"
        _shot(page, "instances.png")

        page.fill(".topsearch input[name=q]", KEY)
        page.press(".topsearch input[name=q]", "Enter")
        page.wait_for_url(f"{url}/search?q={KEY}")
        _shot(page, "search.png")
        page.click(f"#search-instances a[href='/sagas/{saga_id}']")
        page.wait_for_url(f"{url}/sagas/{saga_id}")
        assert page.locator("#instance-state").inner_text() == "failed · dead-lettered"
        _shot(page, "instance-dead-lettered.png")

        page.click("#actions a:has-text('Retry now')")
        page.wait_for_url(f"{url}/sagas/{saga_id}/actions/retry*")
        page.fill("#reason", "carrier API is back (INC-4821)")
        _shot(page, "confirm-retry.png")
        page.click("button:has-text('Confirm: Retry now')")
        page.wait_for_url(f"{url}/sagas/{saga_id}")
        assert page.locator("#instance-state").inner_text() != "completed"

        page.evaluate("window.__notReloaded = true")
        expect(page.locator("#instance-state")).to_have_text("completed", timeout=30_000)
        assert page.evaluate("window.__notReloaded") is True  # the poll updated it in place
        assert page.locator("#instance[hx-trigger]").count() == 0  # and polling stopped
        assert "carrier API is back (INC-4821)" in page.locator("#operator-actions").inner_text()
        expect(page.locator("#action-results")).to_contain_text("retry by operator at")
        expect(page.locator("#action-results")).to_contain_text("→ completed at")
        _shot(page, "instance-completed.png")
        assert blocked == []
    finally:
        SLOW.pop(KEY, None)
        context.close()


def test_a_bulk_retry_acts_on_its_dry_run_and_its_report_follows_each_instance_live(
    browser: Any, running: tuple[SagaEngine, str]
) -> None:
    eng, url = running
    keys = ["ORD-BULK-1", "ORD-BULK-2"]
    FAILING.update(keys)
    try:
        for key in keys:
            eng.run("order", {"amount": 5}, business_key=key)
    finally:
        FAILING.difference_update(keys)
    SLOW[keys[1]] = 3.0  # one retry takes a while: the report shows it running, then done
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    try:
        _sign_in(page, url, "operator")
        page.goto(f"{url}/bulk/new?dry_run=1&action=retry&saga=order&state=failed&rate=100")
        expect(page.locator("#dry-run-count")).to_contain_text("2")
        FAILING.add("ORD-BULK-LATE")  # a dead letter arrives while the operator reads
        eng.run("order", {"amount": 5}, business_key="ORD-BULK-LATE")
        page.fill("#reason", "carrier <back> (INC-77)")
        page.click("button:has-text('Confirm: Retry now on 2 instances')")
        page.wait_for_url(f"{url}/bulk/*")
        expect(page.locator("#bulk-more")).to_contain_text("1 more instance matched")

        page.evaluate("window.__notReloaded = true")
        expect(page.locator("#bulk-settled")).to_be_visible(timeout=30_000)
        assert page.evaluate("window.__notReloaded") is True  # the poll updated it in place
        assert page.locator("#bulk-progress[hx-trigger]").count() == 0  # and polling stopped
        expect(page.locator("#bulk-results")).to_contain_text("2 completed")
        _shot(page, "bulk-report-settled.png")

    finally:
        FAILING.discard("ORD-BULK-LATE")
        SLOW.pop(keys[1], None)
        context.close()


def test_a_bulk_confirmation_refused_keeps_what_was_typed_and_confirms_again(
    browser: Any, running: tuple[SagaEngine, str]
) -> None:
    eng, url = running
    FAILING.add("ORD-LUNCH")
    try:
        eng.run("order", {"amount": 5}, business_key="ORD-LUNCH")
    finally:
        FAILING.discard("ORD-LUNCH")
    context = browser.new_context()
    page = context.new_page()
    try:
        _sign_in(page, url, "operator")
        page.goto(f"{url}/bulk/new?dry_run=1&action=retry&saga=order&state=failed")
        page.fill("input[name=rate]", "2.5")
        page.click("button:has-text('Dry run')")
        page.fill("#reason", "carrier <back> (INC-78)")
        # The operator goes to lunch: the dry run's snapshot expires meanwhile.
        BulkStore(eng.store.db).purge_snapshots(eng.clock() + SNAPSHOT_TTL_MS + 1)
        page.click("button:has-text('Confirm: Retry now on 1 instance')")

        expect(page.locator("#problem")).to_contain_text("older than an hour")
        expect(page.locator("#reason")).to_have_value("carrier <back> (INC-78)")
        expect(page.locator("#bulk-filter input[name=rate]")).to_have_value("2.5")
        _shot(page, "bulk-refused.png")
        page.click("button:has-text('Confirm: Retry now on 1 instance')")  # the fresh dry run
        expect(page.locator("#bulk-results")).to_contain_text("1 applied", timeout=10_000)
        expect(page.locator(".pagehead")).to_contain_text("on 1 instance")
    finally:
        context.close()


def test_the_list_refreshes_in_place_keeping_its_filters(
    browser: Any, running: tuple[SagaEngine, str]
) -> None:
    eng, url = running
    context = browser.new_context()
    page = context.new_page()
    try:
        _sign_in(page, url, "viewer")
        page.goto(f"{url}/sagas?state=completed&saga=order")
        page.evaluate("window.__notReloaded = true")
        done = eng.run("order", {}, business_key="ORD-LIVE")
        page.wait_for_selector(f"a[href='/sagas/{done.id}']", timeout=20_000)
        assert page.evaluate("window.__notReloaded") is True
        assert page.url.endswith("state=completed&saga=order")
        assert page.locator(".tab.active").inner_text().startswith("Completed")
    finally:
        context.close()


def test_everything_works_with_javascript_off(
    browser: Any, running: tuple[SagaEngine, str]
) -> None:
    eng, url = running
    saga_id = _seed(eng)
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    try:
        _sign_in(page, url, "operator")
        page.goto(f"{url}/sagas?state=failed")
        page.click(f"a[href='/sagas/{saga_id}']")
        page.click("#actions a:has-text('Cancel saga')")
        page.fill("#reason", "customer cancelled by phone")
        page.click("button:has-text('Confirm: Cancel saga')")
        page.wait_for_url(f"{url}/sagas/{saga_id}")
        assert page.locator("#instance-state").inner_text() == "cancelled"
        assert "Cancel saga: done" in page.locator(".flash").inner_text()
    finally:
        context.close()


@pytest.fixture
def with_a_wait(sqlite_url: str) -> Iterator[tuple[SagaEngine, str]]:
    """A console and a worker whose sagas include one that waits for an approval."""
    from tests.console.test_console_signal import approve

    eng = SagaEngine([*SAGAS, approve], settings=make_engine(sqlite_url).settings)
    app = make_app(eng, WTF_CSRF_ENABLED=True)
    worker = eng.worker(concurrency=2).start()
    server = ConsoleServer(app).start()
    try:
        yield eng, server.url
    finally:
        server.stop()
        worker.stop()
        eng.close()


def test_an_operator_sends_the_awaited_signal_and_the_saga_moves_on(
    browser: Any, with_a_wait: tuple[SagaEngine, str]
) -> None:
    eng, url = with_a_wait
    saga_id = eng.start("approve", {"order": "ORD-77"}).id
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    try:
        _sign_in(page, url, "operator")
        page.goto(f"{url}/sagas/{saga_id}")
        button = page.locator("#signals a:has-text('Send signal')")
        expect(button).to_be_visible(timeout=20_000)  # once the worker reached the wait
        button.click()
        page.wait_for_url(f"{url}/sagas/{saga_id}/signals/manager_approval*")
        page.fill("#signal_data", '{"approved": tru}')
        page.fill("#reason", "approved by phone (INC-5120)")
        page.click("button:has-text('Confirm: send')")
        expect(page.locator(".problem")).to_contain_text("not JSON")
        assert page.locator("#reason").input_value() == "approved by phone (INC-5120)"

        page.fill("#signal_data", '{"approved": true, "by": "<b>Grace</b>"}')
        _shot(page, "confirm-signal.png")
        page.click("button:has-text('Confirm: send')")
        page.wait_for_url(f"{url}/sagas/{saga_id}")
        expect(page.locator("#instance-state")).to_have_text("completed", timeout=30_000)
        assert "approved by phone (INC-5120)" in page.locator("#operator-actions").inner_text()
        assert page.locator("#instance b:has-text('Grace')").count() == 0  # shown, not rendered
        assert eng.get(saga_id).steps[1].output == {"approved": True, "by": "<b>Grace</b>"}
    finally:
        context.close()
