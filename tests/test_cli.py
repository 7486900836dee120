"""The ``saga`` command: its output, its JSON documents, its refusals and its exit codes.

Most tests drive it through click's CliRunner against a real store; a few
run the installed ``saga`` executable in a subprocess, as a user would.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from console.cli import main
from engine import Queries, SagaEngine, SagaState, Settings, logs
from engine import cli as engine_cli
from engine import settings as settings_module
from engine.model import Instance
from engine.store import migrate
from engine.store import schema as t
from engine.worker import Worker
from examples import order_fulfillment as orders
from examples import travel_booking as travel

APPS = "examples.travel_booking,examples.order_fulfillment"
SAGA = str(Path(sys.executable).parent / "saga")
ROOT = Path(__file__).resolve().parent.parent

SHOW_KEYS = {
    "schema_version",
    "instance",
    "steps",
    "events",
    "dead_letters",
    "operator_actions",
    "allowed_actions",
}
INSTANCE_KEYS = {
    "id",
    "saga_name",
    "saga_version",
    "state",
    "phase",
    "current_step",
    "current_step_name",
    "step_count",
    "payload",
    "correlation_id",
    "business_key",
    "idempotency_key",
    "version",
    "created_at",
    "updated_at",
    "last_progress_at",
    "next_run_at",
    "lease_owner",
    "lease_expires_at",
}
LIST_KEYS = INSTANCE_KEYS - {"phase", "payload", "idempotency_key", "lease_expires_at"}
SIDE_KEYS = {
    "status",
    "attempts",
    "started_at",
    "finished_at",
    "deadline_at",
    "error",
    "idempotency_key",
    "duplicates_absorbed",
}


@pytest.fixture
def engine(store_url: str) -> Iterator[SagaEngine]:
    eng = SagaEngine(
        [travel.book_trip, orders.fulfil_order],
        settings=Settings(database_url=store_url, poll_seconds=0.05, concurrency=4),
    )
    travel.init_engine(eng)
    orders.init_engine(eng)
    yield eng
    drop_participant_tables(eng)
    eng.close()


def drop_participant_tables(eng: SagaEngine) -> None:
    # The PostgreSQL test database outlives the test: leave only the store's own tables.
    for participant in (*travel.PARTICIPANTS, *orders.PARTICIPANTS):
        participant.table.drop(eng.store.db, checkfirst=True)


@pytest.fixture
def worker(engine: SagaEngine) -> Iterator[Worker]:
    running = engine.worker(4).start()
    yield running
    running.stop()


@pytest.fixture
def saga(store_url: str) -> Any:
    """Run ``saga ARGS...`` in-process against the test's store, with the examples loaded."""

    def invoke(*args: str, app: bool = True) -> Result:
        argv = ["-A", APPS, *args] if app else list(args)
        env = {"SAGA_DATABASE_URL": store_url, "SAGA_APP": "", "USER": "tester"}
        return CliRunner().invoke(main, argv, env=env)

    return invoke


def wait_for(engine: SagaEngine, saga_id: str, *states: SagaState) -> Instance:
    deadline = time.monotonic() + 30
    while True:
        inst = engine.get(saga_id)
        if inst.state in states:
            return inst
        if time.monotonic() > deadline:
            pytest.fail(f"saga {saga_id} is still {inst.state}; expected {states}")
        time.sleep(0.02)


def row_counts(url: str) -> dict[str, int]:
    """Rows in every store table: what "nothing was written" is checked against."""
    db = sa.create_engine(url)
    try:
        with db.connect() as conn:
            return {
                table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                for table in t.metadata.sorted_tables
            }
    finally:
        db.dispose()


def assert_refused(result: Result, code: int, *fragments: str) -> None:
    """A failed command: one line on stderr naming the problem, nothing on stdout."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.stdout == ""
    message = result.stderr.strip()
    assert "\n" not in message, message
    assert message.startswith("saga: error: ")
    for fragment in fragments:
        assert fragment in message


def dead_lettered_order(engine: SagaEngine) -> Instance:
    started = engine.start("fulfil_order", {"fail": {"shipping": "flaky:3"}})
    return wait_for(engine, started.id, SagaState.FAILED)


# -- start, list, show ---------------------------------------------------------


def test_start_prints_the_new_instance_as_json(saga: Any, engine: SagaEngine) -> None:
    result = saga(
        "start",
        "book_trip",
        "--payload",
        '{"hotel": "Adlon"}',
        "--business-key",
        "T-42",
        "--correlation-id",
        "req-1",
        "--json",
    )

    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["created"] is True
    assert set(doc["instance"]) == INSTANCE_KEYS
    inst = engine.get(doc["instance"]["id"])
    assert (inst.saga_name, inst.state) == ("book_trip", SagaState.RUNNING)
    assert (inst.payload, inst.business_key, inst.correlation_id) == (
        {"hotel": "Adlon"},
        "T-42",
        "req-1",
    )


def test_start_twice_with_one_idempotency_key_makes_one_instance(saga: Any, store_url: str) -> None:
    first = saga("start", "book_trip", "--idempotency-key", "trip-7", "--json")
    again = saga("start", "book_trip", "--idempotency-key", "trip-7")

    assert first.exit_code == again.exit_code == 0
    saga_id = json.loads(first.stdout)["instance"]["id"]
    assert again.stdout.startswith(f"already started (same idempotency key): {saga_id}")
    assert row_counts(store_url)["saga_instances"] == 1


def test_list_filters_by_state_and_saga_and_pages(
    saga: Any, engine: SagaEngine, worker: Worker
) -> None:
    done = [engine.start("book_trip", {}).id for _ in range(3)]
    for saga_id in done:
        wait_for(engine, saga_id, SagaState.COMPLETED)
    worker.stop()
    waiting = engine.start("fulfil_order", {}).id

    page = json.loads(saga("list", "--state", "completed", "--limit", "2", "--json").stdout)
    assert page["schema_version"] == 1
    assert set(page["instances"][0]) == LIST_KEYS
    assert [i["state"] for i in page["instances"]] == ["completed", "completed"]
    rest = json.loads(
        saga("list", "--state", "completed", "--cursor", page["next_cursor"], "--json").stdout
    )
    assert rest["next_cursor"] is None
    listed = [i["id"] for i in page["instances"] + rest["instances"]]
    assert listed == list(reversed(done))  # newest first

    orders_only = json.loads(saga("list", "--saga", "fulfil_order", "--json").stdout)
    assert [i["id"] for i in orders_only["instances"]] == [waiting]

    text = saga("list")
    assert text.exit_code == 0
    assert text.stdout.splitlines()[0].split() == [
        "ID",
        "SAGA",
        "STATE",
        "STEP",
        "BUSINESS",
        "KEY",
        "UPDATED",
    ]
    assert len(text.stdout.splitlines()) == 5


def test_show_json_has_steps_timeline_dead_letters_and_actions(
    saga: Any, engine: SagaEngine, worker: Worker
) -> None:
    inst = dead_lettered_order(engine)

    doc = json.loads(saga("show", inst.id, "--json").stdout)

    assert set(doc) == SHOW_KEYS
    assert set(doc["instance"]) == INSTANCE_KEYS
    assert doc["instance"]["state"] == "failed"
    assert [s["name"] for s in doc["steps"]] == [
        "reserve_inventory",
        "charge_payment",
        "ship_order",
    ]
    assert [s["kind"] for s in doc["steps"]] == ["compensatable", "pivot", "retriable"]
    ship = doc["steps"][2]
    assert set(ship["action"]) == SIDE_KEYS | {"output"}
    assert set(ship["compensation"]) == SIDE_KEYS
    assert (ship["action"]["status"], ship["action"]["attempts"]) == ("failed", 3)
    assert ship["action"]["idempotency_key"] == f"{inst.id}:ship_order:action"
    assert "temporarily unavailable" in ship["action"]["error"]
    assert doc["events"][0]["kind"] == "saga_started"
    assert doc["events"][-1]["kind"] == "dead_lettered"
    [letter] = doc["dead_letters"]
    assert (letter["step_name"], letter["resolved_at"]) == ("ship_order", None)
    assert doc["operator_actions"] == []
    assert doc["allowed_actions"] == ["retry", "skip", "cancel"]


def test_show_text_without_the_app_still_shows_the_instance(saga: Any, engine: SagaEngine) -> None:
    saga_id = engine.start("book_trip", {}, business_key="T-9").id

    result = saga("show", saga_id, app=False)

    assert result.exit_code == 0, result.output
    assert f"saga {saga_id}  book_trip v1  running" in result.stdout
    assert "T-9" in result.stdout
    assert "register the saga with -A" in result.stdout
    assert "saga_started" in result.stdout


# -- operator actions ----------------------------------------------------------


def test_retry_a_dead_lettered_order_records_who_and_why(
    saga: Any, engine: SagaEngine, worker: Worker
) -> None:
    inst = dead_lettered_order(engine)

    result = saga(
        "retry", inst.id, "--reason", "carrier is back", "--expected-version", str(inst.version)
    )

    assert result.exit_code == 0, result.output
    assert f"retry: saga {inst.id} is now running" in result.stdout
    wait_for(engine, inst.id, SagaState.COMPLETED)
    [action] = Queries(engine.store).operator_actions(saga_id=inst.id)
    assert (action.actor, action.action, action.reason) == ("tester", "retry", "carrier is back")
    assert (action.state_before, action.state_after) == ("failed", "running")


def test_skip_the_failed_last_step_completes_the_order(
    saga: Any, engine: SagaEngine, worker: Worker
) -> None:
    inst = dead_lettered_order(engine)

    result = saga("skip", inst.id, "--reason", "shipped by hand", "--actor", "bob", "--json")

    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["action"], doc["instance"]["state"]) == ("skip", "completed")
    assert engine.get(inst.id).steps[2].status == "skipped"


def test_skip_a_stuck_compensation_goes_on_compensating(
    saga: Any, engine: SagaEngine, worker: Worker
) -> None:
    payload = {"fail": {"car": "permanent"}, "fail_compensation": {"flight": "always"}}
    inst = wait_for(engine, engine.start("book_trip", payload).id, SagaState.FAILED)

    result = saga("skip", inst.id, "--reason", "cancelled the flight by phone")

    assert result.exit_code == 0, result.output
    done = wait_for(engine, inst.id, SagaState.COMPENSATED)
    assert [s.comp_status for s in done.steps] == ["compensated", "skipped", "compensated"]


def test_compensate_before_the_pivot_and_refused_after_it(
    saga: Any, engine: SagaEngine, store_url: str
) -> None:
    fresh = engine.start("fulfil_order", {}).id  # no worker: nothing started yet

    result = saga("compensate", fresh, "--reason", "customer withdrew")

    assert result.exit_code == 0, result.output
    assert engine.get(fresh).state is SagaState.COMPENSATED


def test_compensate_is_refused_after_the_pivot(
    saga: Any, engine: SagaEngine, worker: Worker, store_url: str
) -> None:
    inst = dead_lettered_order(engine)
    before = row_counts(store_url)

    result = saga("compensate", inst.id, "--reason", "refund instead")

    assert_refused(result, 4, "passed its pivot step 'charge_payment'")
    assert row_counts(store_url) == before
    assert engine.get(inst.id).version == inst.version


def test_cancel_stops_an_instance_and_undoes_nothing(saga: Any, engine: SagaEngine) -> None:
    saga_id = engine.start("book_trip", {}).id

    result = saga("cancel", saga_id, "--reason", "duplicate booking", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["instance"]["state"] == "cancelled"
    assert engine.get(saga_id).state is SagaState.CANCELLED
    assert travel.hotels.records(saga_id) == []


@pytest.mark.parametrize("command", ["retry", "skip", "compensate", "cancel"])
def test_every_action_is_refused_on_a_finished_saga(
    command: str, saga: Any, engine: SagaEngine, store_url: str
) -> None:
    inst = engine.run("book_trip", {})
    assert inst.state is SagaState.COMPLETED
    before = row_counts(store_url)

    result = saga(command, inst.id, "--reason", "why not")

    assert_refused(result, 4, f"saga {inst.id}", "while it is completed", "already finished")
    assert row_counts(store_url) == before


def test_a_stale_expected_version_is_refused(saga: Any, engine: SagaEngine, store_url: str) -> None:
    saga_id = engine.start("book_trip", {}).id
    seen = engine.get(saga_id).version
    # Someone else acts first: the version the operator saw is now stale.
    engine.operations.retry(saga_id, actor="colleague", reason="nudge")
    before = row_counts(store_url)

    result = saga("cancel", saga_id, "--reason", "stop", "--expected-version", str(seen))

    assert_refused(result, 4, "changed since you read it", f"you saw version {seen}")
    assert row_counts(store_url) == before
    assert engine.get(saga_id).state is SagaState.RUNNING


# -- bad input: a clear message, a distinct exit code, nothing written ---------


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (["start", "book_trip", "--payload", "{not json"], 2, ["invalid --payload", "not JSON"]),
        (["start", "book_trip", "--payload", "@/no/such/file.json"], 2, ["cannot read"]),
        (["start", "book_trip", "--payload"], 2, ["--payload", "requires an argument"]),
        (["start", "no_such_saga"], 3, ["unknown saga 'no_such_saga'", "book_trip"]),
        (["start", "book_trip", "--business-key", " "], 2, ["business key"]),
        (["show", "no-such-id"], 3, ["no saga instance with id 'no-such-id'"]),
        (["retry", "no-such-id", "--reason", "x"], 3, ["no saga instance"]),
        (["cancel", "no-such-id"], 2, ["invalid reason", "audit log"]),
        (["skip", "no-such-id", "--reason", "   "], 2, ["invalid reason"]),
        (["retry", "x", "--reason", "r", "--expected-version", "two"], 2, ["'two'"]),
        (["list", "--state", "stuck"], 2, ["invalid --state", "'stuck'", "running"]),
        (["list", "--limit", "0"], 2, ["invalid --limit", "from 1 to 500"]),
        (["list", "--cursor", "garbage"], 2, ["invalid cursor"]),
        (["frobnicate"], 2, ["No such command 'frobnicate'"]),
    ],
)
def test_bad_input_is_refused_with_one_line_and_nothing_written(
    args: list[str], code: int, fragments: list[str], saga: Any, store_url: str
) -> None:
    before = row_counts(store_url)

    result = saga(*args)

    assert_refused(result, code, *fragments)
    assert row_counts(store_url) == before


def test_an_unknown_app_module_is_bad_input(saga: Any) -> None:
    result = saga("-A", "no_such_module_here", "start", "book_trip", app=False)
    assert_refused(result, 2, "no module named 'no_such_module_here'")


def test_a_module_without_sagas_is_bad_input(saga: Any) -> None:
    result = saga("-A", "examples.participants", "start", "book_trip", app=False)
    assert_refused(result, 2, "examples.participants", "defines no Saga")


def test_apps_may_be_repeated_or_comma_separated(saga: Any) -> None:
    repeated = saga(
        "-A",
        "examples.travel_booking",
        "-A",
        "examples.order_fulfillment",
        "start",
        "fulfil_order",
        app=False,
    )
    assert repeated.exit_code == 0, repeated.output


def test_a_missing_store_is_reported_not_created(tmp_path: Path) -> None:
    db = tmp_path / "absent.db"
    result = CliRunner().invoke(main, ["list"], env={"SAGA_DATABASE_URL": f"sqlite:///{db}"})

    assert_refused(result, 1, "no store at", "saga db upgrade")
    assert not db.exists()


def test_db_upgrade_then_current(tmp_path: Path) -> None:
    env = {"SAGA_DATABASE_URL": f"sqlite:///{tmp_path / 'new.db'}"}
    runner = CliRunner()

    assert runner.invoke(main, ["db", "current"], env=env).stdout.startswith("none")
    upgraded = runner.invoke(main, ["db", "upgrade"], env=env)
    current = runner.invoke(main, ["db", "current"], env=env)

    assert upgraded.exit_code == 0, upgraded.output
    assert current.exit_code == 0
    assert current.stdout.strip() in upgraded.stdout
    assert "newest" not in current.stdout


def test_a_database_url_of_another_kind_is_bad_input() -> None:
    result = CliRunner().invoke(
        main, ["db", "upgrade"], env={"SAGA_DATABASE_URL": "mysql://db/sagas"}
    )
    assert_refused(result, 2, "SAGA_DATABASE_URL")


# -- the real executable ---------------------------------------------------------


def run_saga(*args: str, url: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SAGA_DATABASE_URL": url, "SAGA_APP": APPS}
    return subprocess.run(
        [SAGA, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_saga_executable_starts_lists_and_refuses(store_url: str) -> None:
    started = run_saga("start", "book_trip", "--business-key", "T-77", "--json", url=store_url)
    assert started.returncode == 0, started.stderr
    saga_id = json.loads(started.stdout)["instance"]["id"]

    listed = run_saga("list", "--json", url=store_url)
    assert [i["id"] for i in json.loads(listed.stdout)["instances"]] == [saga_id]

    bad = run_saga("start", "book_trip", "--payload", "[1, 2", url=store_url)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.strip().startswith("saga: error: invalid --payload: not JSON")
    assert row_counts(store_url)["saga_instances"] == 1


def test_saga_version_is_the_installed_packages() -> None:
    # Settings are not read: the version is there even with a store that could not be used.
    env = {**os.environ, "SAGA_DATABASE_URL": "mysql://db/sagas"}
    proc = subprocess.run(
        [SAGA, "--version"], env=env, capture_output=True, text=True, timeout=60, check=False
    )

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"saga {importlib.metadata.version('saga-engine')}\n"


def test_saga_worker_runs_sagas_and_drains_on_sigterm(engine: SagaEngine, store_url: str) -> None:
    saga_id = engine.start("book_trip", {"fail": {"car": "permanent"}}).id
    env = {
        **os.environ,
        "SAGA_DATABASE_URL": store_url,
        "SAGA_APP": APPS,
        "SAGA_POLL_SECONDS": "0.05",
        "SAGA_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [SAGA, "worker", "--concurrency", "2"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        inst = wait_for(engine, saga_id, SagaState.COMPENSATED)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)

    assert proc.returncode == 0, err
    assert [s.comp_status for s in inst.steps] == ["compensated"] * 3
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(r["message"].endswith("stopped") for r in records), err


def test_saga_demo_runs_on_sqlite_with_nothing_configured(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    proc = subprocess.run(
        [SAGA, "demo", "--duration", "2", "--rate", "10", "--seed", "3", "--console-port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    assert "saga demo: store sqlite:///saga.db" in proc.stdout
    assert "[done] started" in proc.stdout
    assert "saga list --state failed" in proc.stdout
    counts = row_counts(f"sqlite:///{tmp_path / 'saga.db'}")
    assert counts["saga_instances"] > 0


# -- logging -------------------------------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[None]:
    handler = logs.configure("json", "INFO")
    yield
    logging.getLogger().removeHandler(handler)


def test_json_log_lines_carry_saga_and_correlation_ids(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    log = logging.getLogger("test.cli")

    with logs.bound("saga-1", "corr-1"):
        log.info("inside %s", "the step")
    log.warning("outside", extra={"saga_id": "saga-2"})

    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["message"] == "inside the step"
    assert (first["saga_id"], first["correlation_id"]) == ("saga-1", "corr-1")
    assert (second["level"], second["saga_id"]) == ("WARNING", "saga-2")
    assert "correlation_id" not in second


# -- the documentation keeps up ---------------------------------------------------------


def test_the_readme_documents_every_setting() -> None:
    source = Path(settings_module.__file__).read_text(encoding="utf-8")
    names = set(re.findall(r'"(SAGA_[A-Z_]+)"', source))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")

    assert names
    assert sorted(n for n in names if f"`{n}`" not in readme) == []


def test_docs_cli_covers_every_command() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    headings = [line for line in doc.splitlines() if line.startswith("### `saga ")]
    documented = {word for line in headings for word in re.split(r"[\s`|\[\]]+", line)}

    assert sorted(set(main.commands) - documented) == []
    assert {"upgrade", "current"} <= documented


@contextmanager
def _store_at_revision(url: str, revision: str) -> Iterator[None]:
    """Pretend the store is at ``revision``; put the real one back afterwards."""

    def set_to(value: str) -> None:
        db = sa.create_engine(url)
        with db.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :r"), {"r": value})
        db.dispose()

    real = migrate.current(url)
    assert real is not None
    set_to(revision)
    try:
        yield
    finally:
        set_to(real)


def test_a_store_upgraded_by_a_newer_release_still_serves(saga: Any, store_url: str) -> None:
    # A rolling deploy upgrades the schema first; the old release must keep working.
    with _store_at_revision(store_url, "9999_from_the_future"):
        result = saga("list", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["instances"] == []


def test_a_store_behind_the_code_is_refused_with_the_fix(saga: Any, store_url: str) -> None:
    with _store_at_revision(store_url, "0002"):
        result = saga("list")
    assert result.exit_code == 1
    assert "is at schema 0002" in result.stderr and "saga db upgrade" in result.stderr


# -- the engine's commands, and the console's beside them ----------------------------


def test_saga_is_the_engines_commands_and_the_consoles() -> None:
    engine_commands = set(engine_cli.main.commands)

    assert {"db", "worker", "sweeper", "participant", "start", "show", "bulk"} <= engine_commands
    assert not {"console", "user", "demo"} & engine_commands  # `python -m engine.cli`
    assert set(main.commands) == engine_commands | {"console", "user", "demo"}


def test_the_engine_never_imports_the_console() -> None:
    # The console composes the `saga` command (console.cli); nothing in the engine may
    # import it, not inside a function and not for type checking either.
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sorted((ROOT / "engine").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if "console" in _top_level_imports(node)
    ]
    assert found == []


def _top_level_imports(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return {node.module.split(".")[0]}
    return set()
