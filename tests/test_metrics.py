"""Prometheus metrics: what is exported equals what the store holds.

Counters are process-wide, so each test compares a scrape before and after
the run it scripts (under saga names of its own); the gauges are read from
the store at scrape time, so they are compared directly. The scrapes are
parsed with prometheus_client's own parser, and checked with ``promtool``
(Debian's ``prometheus`` package) where it is installed, always under CI.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from console import create_app
from engine import (
    IdempotencyGuard,
    NonRetryableError,
    Retry,
    Saga,
    SagaEngine,
    SagaState,
    Settings,
    StepContext,
    metrics,
)
from engine.metrics import Samples, StoreCollector, total
from engine.model import Event, EventKind, Transition
from engine.store import schema as t
from tests.conftest import IN_CI
from tests.helpers.sweeps import World, saga, wait_for_line

ROOT = Path(__file__).resolve().parent.parent
OUTCOME_OF_EVENT = {
    "attempt_succeeded": "succeeded",
    "attempt_failed": "failed",
    "attempt_timed_out": "timed_out",
    "attempt_abandoned": "abandoned",
}


@pytest.fixture
def world(store_url: str) -> Iterator[World]:
    made = World(store_url)
    yield made
    made.close()


def scrape(engine: SagaEngine) -> Samples:
    collector = StoreCollector(engine.store, engine.registry.names, engine.clock)
    return metrics.values(metrics.exposition(collector).decode())


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def store_rows(engine: SagaEngine, query: sa.Select[tuple[str, int]]) -> dict[str, int]:
    with engine.store.db.connect() as c:
        return {str(k): int(n) for k, n in c.execute(query)}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if IN_CI:
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


# -- the counters and gauges against the store ------------------------------------------


def test_exported_values_equal_the_store_after_a_scripted_run(world: World) -> None:
    flaky_once = Retry(max_attempts=2, initial_delay=timedelta(0), jitter=0.0)
    engine = world.engine(saga("m_shop", default_retry=flaky_once))
    before = scrape(engine)
    script = (
        [{}] * 4  # complete
        + [{"fatal": ["b"]}] * 3  # compensated
        + [{"fatal": ["b"], "fail_undo": ["a"]}] * 2  # a's undo fails: dead-lettered
        + [{"fail": ["b"]}]  # b fails twice, compensated
    )
    ids = [engine.run("m_shop", payload).id for payload in script]
    waiting = engine.start("m_shop", {}).id  # never picked up
    world.clock.advance(minutes=20)
    engine.sweeps().stuck()  # flags the waiting one

    after = scrape(engine)

    i, d = t.instances.c, t.dead_letters.c
    states = store_rows(engine, sa.select(i.state, sa.func.count()).group_by(i.state))
    assert delta(before, after, "saga_started_total", saga="m_shop") == len(ids) + 1
    assert delta(before, after, "saga_completed_total", saga="m_shop") == states["completed"]
    assert delta(before, after, "saga_compensated_total", saga="m_shop") == states["compensated"]
    letters = store_rows(engine, sa.select(d.saga_name, sa.func.count()).group_by(d.saga_name))
    assert delta(before, after, "saga_dead_lettered_total", saga="m_shop") == letters["m_shop"]

    assert_attempts_match_the_timeline(engine, "m_shop", before, after)
    assert delta(before, after, "saga_compensation_failures_total", saga="m_shop") > 0

    assert total(after, "saga_instances", saga="m_shop", state="failed") == states["failed"] == 2
    assert total(after, "saga_instances", saga="m_shop", state="running") == states["running"]
    assert total(after, "saga_instances", saga="m_shop", state="compensating") == 0
    assert total(after, "saga_stuck_instances", saga="m_shop") == 1
    assert total(after, "saga_dead_letter_depth", saga="m_shop") == 2
    assert total(after, "saga_dead_letter_oldest_age_seconds", saga="m_shop") == 20 * 60
    assert total(after, "saga_store_up") == 1

    # A saga id is never a label value: series stay few however many sagas run.
    label_values = {value for (_name, labels), _v in after.items() for _k, value in labels}
    assert not label_values & {*ids, waiting}


def assert_attempts_match_the_timeline(
    engine: SagaEngine, saga_name: str, before: Samples, after: Samples
) -> None:
    """Attempts (and their durations) by step, phase and outcome equal the stored events."""
    e = t.events.c
    attempts = (
        sa.select(e.kind, e.step_name, e.phase, sa.func.count())
        .where(e.kind.in_(list(OUTCOME_OF_EVENT)))
        .group_by(e.kind, e.step_name, e.phase)
    )
    with engine.store.db.connect() as c:
        recorded = list(c.execute(attempts))
    assert recorded
    for kind, step, phase, n in recorded:
        labels = {
            "saga": saga_name,
            "step": step,
            "phase": phase,
            "outcome": OUTCOME_OF_EVENT[kind],
        }
        for name in ("saga_step_attempts_total", "saga_step_duration_seconds_count"):
            assert delta(before, after, name, **labels) == n, (name, labels)
    undo_failures = sum(
        n
        for kind, _s, phase, n in recorded
        if phase == "compensate" and kind != "attempt_succeeded"
    )
    assert delta(before, after, "saga_compensation_failures_total", saga=saga_name) == undo_failures


def in_the_transaction(name: str) -> Callable[[StepContext], object]:
    def action(ctx: StepContext) -> object:
        assert ctx.connection is not None  # its writes would commit with its result
        if name in ctx.payload.get("fatal", ()):
            raise NonRetryableError(f"{name} said no")
        return {"done": name}

    return action


def test_a_transactional_attempt_run_again_after_a_rollback_counts_once(world: World) -> None:
    # A failing step aborts the optimistic one-transaction batch; the batch runs again
    # with a savepoint per attempt. Only what was committed is counted.
    ledger = Saga("m_ledger", default_retry=Retry(max_attempts=1))
    for name in ("debit", "credit"):
        ledger.add_step(name, in_the_transaction(name), lambda ctx, out: None, transactional=True)
    engine = world.engine(ledger)
    before = scrape(engine)

    engine.run("m_ledger", {})
    engine.run("m_ledger", {"fatal": ["credit"]})

    after = scrape(engine)
    assert delta(before, after, "saga_completed_total", saga="m_ledger") == 1
    assert delta(before, after, "saga_compensated_total", saga="m_ledger") == 1
    assert_attempts_match_the_timeline(engine, "m_ledger", before, after)


def test_a_transition_rolled_back_is_not_counted(world: World) -> None:
    engine = world.engine(saga("m_undone"))
    inst = engine.start("m_undone", {}).instance
    finished = replace(inst, state=SagaState.COMPLETED, updated_at=inst.updated_at + 1)
    done = Transition(finished, (Event(EventKind.SAGA_COMPLETED),))
    before = scrape(engine)

    with pytest.raises(RuntimeError), engine.store.transaction() as conn:
        engine.store.save(inst, done, "test", conn=conn)
        raise RuntimeError("what came after the save failed: the save rolls back too")

    assert delta(before, scrape(engine), "saga_completed_total", saga="m_undone") == 0
    with engine.store.transaction() as conn:
        engine.store.save(inst, done, "test", conn=conn)
    assert delta(before, scrape(engine), "saga_completed_total", saga="m_undone") == 1


def test_finished_instances_are_not_counted_by_the_gauges(world: World) -> None:
    engine = world.engine(saga("m_done"))
    for _ in range(3):
        engine.run("m_done", {})

    after = scrape(engine)

    assert {k: v for k, v in after.items() if k[0] == "saga_instances"} == {
        ("saga_instances", (("saga", "m_done"), ("state", state))): 0.0
        for state in ("running", "compensating", "failed")
    }


def test_duplicate_deliveries_absorbed_by_the_guard_are_counted(world: World) -> None:
    engine = world.engine()
    guard = IdempotencyGuard(engine.store.db, "m_hotel")
    before = scrape(engine)

    for _ in range(3):
        guard.run_once("trip-1:hotel:action", lambda conn: {"room": 12})

    after = scrape(engine)
    assert delta(before, after, "saga_duplicates_absorbed_total", scope="m_hotel") == 2


def test_a_duplicate_in_a_rolled_back_transaction_is_not_counted(world: World) -> None:
    engine = world.engine()
    guard = IdempotencyGuard(engine.store.db, "m_rolled")
    key = "trip-9:hotel:action"
    guard.run_once(key, lambda conn: {"room": 7})
    before = scrape(engine)

    with pytest.raises(RuntimeError), engine.store.transaction() as conn:
        assert guard.run_once_in(conn, key, lambda conn: {"room": 8}) == {"room": 7}
        raise RuntimeError("the transactional step failed after the guard")

    assert delta(before, scrape(engine), "saga_duplicates_absorbed_total", scope="m_rolled") == 0
    assert guard.duplicates(key) == 0
    with engine.store.transaction() as conn:
        guard.run_once_in(conn, key, lambda conn: {"room": 8})
    assert delta(before, scrape(engine), "saga_duplicates_absorbed_total", scope="m_rolled") == 1


def test_sweeps_report_their_durations(world: World) -> None:
    engine = world.engine(saga("m_swept"))
    before = scrape(engine)

    engine.sweeps().run_all()

    after = scrape(engine)
    for sweep in ("dispatch", "stuck", "dead_letters", "retention"):
        assert delta(before, after, "saga_sweep_duration_seconds_count", sweep=sweep) == 1


def test_an_unreachable_store_is_reported_not_raised(tmp_path: Path) -> None:
    gone = SagaEngine(settings=Settings(database_url=f"sqlite:///{tmp_path / 'no' / 'x.db'}"))
    try:
        parsed = scrape(gone)
    finally:
        gone.close()
    assert total(parsed, "saga_store_up") == 0
    assert total(parsed, "saga_started_total") >= 0  # the process's own metrics still answer


# -- /metrics on the console and on a port ----------------------------------------------


def console_for(engine: SagaEngine) -> FlaskClient:
    app = create_app({"SAGA_ENGINE": engine, "SECRET_KEY": "test", "TESTING": True})
    return app.test_client()


def test_the_console_serves_metrics_without_a_login(world: World, tmp_path: Path) -> None:
    engine = world.engine(saga("m_console"))
    engine.run("m_console", {"fatal": ["b"], "fail_undo": ["a"]})
    client = console_for(engine)

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    body = response.get_data(as_text=True)
    assert total(metrics.values(body), "saga_dead_letter_depth", saga="m_console") == 1
    exposition = tmp_path / "metrics.txt"
    exposition.write_text(body)
    with exposition.open() as stdin:
        checked = subprocess.run(
            [promtool(), "check", "metrics"],
            check=False,
            stdin=stdin,
            capture_output=True,
            text=True,
        )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_metrics_token_is_asked_for_when_set(store_url: str) -> None:
    settings = Settings(database_url=store_url, metrics_token="s3cret")
    engine = SagaEngine(settings=settings)
    try:
        client = console_for(engine)
        refused = client.get("/metrics")
        wrong = client.get("/metrics", headers={"Authorization": "Bearer guess"})
        right = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    finally:
        engine.close()
    assert (refused.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert "saga_store_up" in right.get_data(as_text=True)


def test_a_metrics_port_answers_scrapes(world: World) -> None:
    engine = world.engine(saga("m_port"))
    engine.run("m_port", {"fatal": ["b"]})
    server = metrics.serve(0, StoreCollector(engine.store, engine.registry.names), addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            parsed = metrics.values(response.read().decode())
    finally:
        server.shutdown()
        server.server_close()
    assert total(parsed, "saga_compensated_total", saga="m_port") >= 1
    assert total(parsed, "saga_instances", saga="m_port", state="running") == 0


def test_a_worker_running_the_sweeper_serves_metrics_on_its_port(store_url: str) -> None:
    env = {
        **os.environ,
        "SAGA_DATABASE_URL": store_url,
        "SAGA_APP": "examples.travel_booking",
        "SAGA_WORKER_ID": "metrics-worker",
    }
    saga_command = str(Path(sys.executable).parent / "saga")
    command = [saga_command, "worker", "--sweeper", "--metrics-port", "0"]
    with subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True) as proc:
        try:
            line = wait_for_line(proc, "metrics on http://")
            url = line.split("metrics on ", 1)[1].split()[0].replace("0.0.0.0", "127.0.0.1")
            parsed = _when(lambda: _leading(url))
            proc.terminate()
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert total(parsed, "saga_sweeper_leader") == 1
    assert total(parsed, "saga_store_up") == 1
    assert ("saga_instances", (("saga", "book_trip"), ("state", "running"))) in parsed


def _leading(url: str) -> Samples | None:
    with urllib.request.urlopen(url, timeout=10) as response:
        parsed = metrics.values(response.read().decode())
    return parsed if total(parsed, "saga_sweeper_leader") == 1 else None


def _when(probe: Callable[[], Samples | None], timeout: float = 30.0) -> Samples:
    give_up = time.monotonic() + timeout
    while (found := probe()) is None:
        if time.monotonic() > give_up:
            raise AssertionError("the worker's sweeper did not lead in time")
        time.sleep(0.1)
    return found


# -- several processes: prometheus_client's multiprocess mode under gunicorn ------------

STARTER = """
import sys
from engine import SagaEngine, Settings
from tests.helpers.sweeps import saga

engine = SagaEngine([saga("m_multi")], settings=Settings(database_url=sys.argv[1]))
for _ in range(int(sys.argv[2])):
    engine.run("m_multi", {"fatal": ["b"], "fail_undo": ["a"]})
engine.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_console_under_gunicorn_reports_every_process_once(
    store_url: str, tmp_path: Path
) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared), "PYTHONPATH": str(ROOT)}
    for runs in (2, 3):  # two processes dead-letter sagas, writing their counters to `shared`
        subprocess.run(
            [sys.executable, "-c", textwrap.dedent(STARTER), store_url, str(runs)],
            env=env,
            cwd=ROOT,
            check=True,
        )
    port = free_port()
    console_env = {
        **env,
        "SAGA_DATABASE_URL": store_url,
        "SAGA_CONSOLE_SECRET_KEY": "test",
    }
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    command = [gunicorn, "-w", "2", "-b", f"127.0.0.1:{port}", "console:create_app()"]
    log = tmp_path / "gunicorn.log"
    with (
        log.open("w") as errors,
        subprocess.Popen(command, env=console_env, cwd=ROOT, stderr=errors) as server,
    ):
        try:
            scrapes = [_get_when_up(f"http://127.0.0.1:{port}/metrics", log) for _ in range(4)]
        finally:
            server.terminate()
            server.wait(30)

    for body in scrapes:
        parsed = metrics.values(body)
        # The counters of both processes, summed; the gauges once, from the store.
        assert total(parsed, "saga_dead_lettered_total", saga="m_multi") == 5
        assert total(parsed, "saga_started_total", saga="m_multi") == 5
        assert total(parsed, "saga_instances", saga="m_multi", state="failed") == 5
        assert body.count('saga_dead_letter_depth{saga="m_multi"}') == 1


def _get_when_up(url: str, log: Path, timeout: float = 60.0) -> str:
    give_up = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return str(response.read().decode())
        except OSError as exc:
            if time.monotonic() > give_up:
                raise AssertionError(f"{url}: {exc}; gunicorn said:\n{log.read_text()}") from exc
            time.sleep(0.1)


# -- the alert rules --------------------------------------------------------------------


def test_the_alert_rules_are_valid_and_fire_as_documented() -> None:
    tool = promtool()
    for args in (["check", "rules", "docs/alerts.yml"], ["test", "rules", "docs/alerts_test.yml"]):
        done = subprocess.run([tool, *args], check=False, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_readme_lists_every_metric(world: World) -> None:
    engine = world.engine(saga("m_readme"))
    body = metrics.exposition(StoreCollector(engine.store, engine.registry.names)).decode()
    readme = (ROOT / "README.md").read_text()
    exported = {
        f.name + ("_total" if f.type == "counter" else "")
        for f in text_string_to_metric_families(body)
        # prometheus_client's `_created` companions are not metrics of their own.
        if f.name.startswith("saga_") and not f.name.endswith("_created")
    }
    assert len(exported) > 15
    assert sorted(n for n in exported if f"`{n}`" not in readme) == []
