"""The ``saga`` command facing hostile text, and the origin it records beside ``--actor``.

Business keys, correlation ids, payloads, errors, actors and reasons are text from
outside. Printed raw, ``\\x1b[2J`` clears the operator's terminal, an OSC sequence
retitles it, ``\\r`` overwrites the saga id a row began with, and U+202E reverses
the rest of a line. Output for people shows each such character as an escape;
``--json`` keeps every value exact.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import time
import unicodedata
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from console.cli import main
from engine import Queries, SagaEngine, SagaState, Settings
from engine.model import Instance
from engine.worker import Worker
from tests.helpers.hostile_app import hostile

APP = "tests.helpers.hostile_app"

#: Each sequence of issue #12, as a business key; the keys differ, so each is one instance.
KEYS = {
    "clear": "ORD-1\x1b[2J",
    "title": "\x1b]0;pwned\x07ORD-2",
    "bel": "ORD\x07-3",
    "cr": "0190a000-0000-7000-8000-000000000000\rORD-4",
    "newline": "ORD-5\nfake row",
    "c1": "ORD-\x9b6",
    "del": "ORD\x7f-7",
    "rlo": "ORD-\u202e8-gpj.exe",
    "isolate": "ORD-\u20669\u2069",
}
ERROR = "declined\x1b[2J\x1b]0;pwned\x07\u202eevil"
BIDI = set("\u061c\u200e\u200f") | {
    chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
}


def raw_controls(output: str) -> list[str]:
    """Every control (C0, DEL, C1) or bidirectional character in ``output``, but its newlines."""
    return [ch for ch in output if ch != "\n" and (unicodedata.category(ch) == "Cc" or ch in BIDI)]


@pytest.fixture
def engine(store_url: str) -> Iterator[SagaEngine]:
    eng = SagaEngine([hostile], settings=Settings(database_url=store_url, poll_seconds=0.05))
    yield eng
    eng.close()


@pytest.fixture
def worker(engine: SagaEngine) -> Iterator[Worker]:
    running = engine.worker(2).start()
    yield running
    running.stop()


@pytest.fixture
def saga(store_url: str) -> Any:
    """Run ``saga -A tests.helpers.hostile_app ARGS...`` in-process against the test's store.

    ``$USER`` and ``$LOGNAME`` claim to be demo-admin: the origin must not believe them.
    """

    def invoke(*args: str) -> Result:
        env = {
            "SAGA_DATABASE_URL": store_url,
            "SAGA_APP": "",
            "SAGA_REDIS_URL": "",
            "USER": "demo-admin",
            "LOGNAME": "demo-admin",
        }
        return CliRunner().invoke(main, ["-A", APP, *args], env=env)

    return invoke


def dead_lettered(engine: SagaEngine, key: str, correlation_id: str | None = None) -> Instance:
    started = engine.start(
        "hostile",
        {"error": ERROR, "note": "\x1b[2J\u202e"},
        business_key=key,
        correlation_id=correlation_id,
    )
    deadline = time.monotonic() + 30
    while (inst := engine.get(started.id)).state is not SagaState.FAILED:
        assert time.monotonic() < deadline, f"saga {inst.id} is still {inst.state}"
        time.sleep(0.02)
    return inst


def shell() -> str:
    """The account this test runs as, and its host, as the origin must name them."""
    return f"{pwd.getpwuid(os.getuid()).pw_name}@{socket.gethostname()}"


# -- output for people ---------------------------------------------------------------


def test_saga_list_shows_every_hostile_key_escaped_in_aligned_columns(
    saga: Any, engine: SagaEngine
) -> None:
    ids = {
        name: engine.start("hostile", {"error": "x"}, business_key=key).id
        for name, key in KEYS.items()
    }

    result = saga("list", "--saga", "hostile")

    assert result.exit_code == 0, result.output
    assert raw_controls(result.stdout) == []
    lines = result.stdout.splitlines()
    assert len(lines) == 1 + len(KEYS)  # the header, one line per instance: no injected row
    header, rows = lines[0], lines[1:]
    updated = header.index("UPDATED")
    for name, saga_id in ids.items():
        [row] = [r for r in rows if r.startswith(saga_id)]
        assert visible_key(KEYS[name]) in row, (name, row)
        # Every row's last column starts where its header does: the escapes kept the widths.
        assert row[updated - 2 : updated] == "  " and row[updated] != " ", (name, row)
        assert row[updated:].endswith(" ago")


def visible_key(key: str) -> str:
    """How a key reads on a terminal: each control and bidi character as its escape."""
    return "".join(
        (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        if unicodedata.category(ch) == "Cc" or ch in BIDI
        else ch
        for ch in key
    )


def test_saga_list_json_keeps_every_key_exact(saga: Any, engine: SagaEngine) -> None:
    for key in KEYS.values():
        engine.start("hostile", {"error": "x"}, business_key=key)

    result = saga("list", "--saga", "hostile", "--json")

    assert result.exit_code == 0, result.output
    keys = {i["business_key"] for i in json.loads(result.stdout)["instances"]}
    assert keys == set(KEYS.values())


def test_saga_show_escapes_keys_payload_errors_actors_and_reasons(
    saga: Any, engine: SagaEngine, worker: Worker
) -> None:
    inst = dead_lettered(engine, KEYS["title"], correlation_id="corr\r\x1b[1A")
    actor, reason = "\x1b]0;root\x07ann", "INC-1\x1b[2J\u202egnirts"
    resolved = saga("resolve", inst.id, "--actor", actor, "--reason", reason)
    assert resolved.exit_code == 0, resolved.output
    assert raw_controls(resolved.stdout) == []

    result = saga("show", inst.id)

    assert result.exit_code == 0, result.output
    assert raw_controls(result.stdout) == []
    out = result.stdout
    for shown in (
        visible_key(KEYS["title"]),
        "corr\\x0d\\x1b[1A",
        "declined\\x1b[2J\\x1b]0;pwned\\x07\\u202eevil",
        "\\x1b]0;root\\x07ann",
        "INC-1\\x1b[2J\\u202egnirts",
        "\\u001b[2J\\u202e",  # the payload, as JSON text
    ):
        assert shown in out, shown


def test_saga_show_json_keeps_every_value_exact(
    saga: Any, engine: SagaEngine, worker: Worker
) -> None:
    inst = dead_lettered(engine, KEYS["rlo"], correlation_id="corr\r\x1b[1A")
    actor, reason = "\x1b]0;root\x07ann", "INC-1\x1b[2J\u202egnirts"
    assert saga("resolve", inst.id, "--actor", actor, "--reason", reason).exit_code == 0

    doc = json.loads(saga("show", inst.id, "--json").stdout)

    assert doc["instance"]["business_key"] == KEYS["rlo"]
    assert doc["instance"]["correlation_id"] == "corr\r\x1b[1A"
    assert doc["instance"]["payload"] == {"error": ERROR, "note": "\x1b[2J\u202e"}
    assert ERROR in doc["dead_letters"][0]["error"]
    [action] = doc["operator_actions"]
    assert (action["actor"], action["reason"]) == (actor, reason)


def test_saga_deadletters_escapes_errors_and_json_keeps_them(
    saga: Any, engine: SagaEngine, worker: Worker
) -> None:
    inst = dead_lettered(engine, KEYS["cr"])

    result = saga("deadletters")
    doc = json.loads(saga("deadletters", "--json").stdout)

    assert result.exit_code == 0, result.output
    assert raw_controls(result.stdout) == []
    [_header, row] = result.stdout.splitlines()
    assert row.startswith(inst.id)
    assert "declined\\x1b[2J\\x1b]0;pwned\\x07\\u202eevil" in row
    [letter] = doc["dead_letters"]
    assert ERROR in letter["error"]


def test_an_error_quoting_hostile_text_is_one_escaped_line(saga: Any, engine: SagaEngine) -> None:
    result = saga("show", "\x1b]0;pwned\x07")

    assert result.exit_code == 3
    assert result.stdout == ""
    assert raw_controls(result.stderr) == []
    assert result.stderr.count("\n") == 1 and "\\x1b]0;pwned\\x07" in result.stderr


# -- cursors ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["list", "deadletters"])
def test_an_oversized_cursor_is_bad_input_in_one_line(
    saga: Any, engine: SagaEngine, command: str
) -> None:
    result = saga(command, "--cursor", "99999999999999999999999_x")

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("saga: error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and "cursor" in result.stderr


# -- origins -------------------------------------------------------------------------


def test_an_action_from_the_cli_records_its_os_user_and_host_beside_the_claimed_actor(
    saga: Any, engine: SagaEngine
) -> None:
    inst = engine.start("hostile", {"error": "x"}).instance

    result = saga("cancel", inst.id, "--actor", "demo-admin", "--reason", "duplicate order")

    assert result.exit_code == 0, result.output
    assert f"recorded as demo-admin, from cli: {shell()}" in result.stdout
    [entry] = Queries(engine.store).operator_actions(saga_id=inst.id)
    assert (entry.actor, entry.origin, entry.origin_detail) == ("demo-admin", "cli", shell())
    shown = saga("show", inst.id)
    assert f"demo-admin (from cli: {shell()}) cancel" in shown.stdout
    [action] = json.loads(saga("show", inst.id, "--json").stdout)["operator_actions"]
    assert (action["actor"], action["origin"], action["origin_detail"]) == (
        "demo-admin",
        "cli",
        shell(),
    )


def test_a_bulk_run_from_the_cli_records_the_cli_origin_on_every_item(
    saga: Any, engine: SagaEngine, worker: Worker
) -> None:
    ids = [dead_lettered(engine, f"ORD-{n}").id for n in range(2)]

    result = saga(
        "bulk",
        "run",
        "cancel",
        "--saga",
        "hostile",
        "--expect",
        "2",
        "--reason",
        "refunded by hand",
        "--actor",
        "demo-admin",
        "--rate",
        "1000",
        "--json",
    )

    assert result.exit_code == 0, result.output
    operation = json.loads(result.stdout)["operation"]
    assert (operation["origin"], operation["origin_detail"]) == ("cli", shell())
    for saga_id in ids:
        [entry] = Queries(engine.store).operator_actions(saga_id=saga_id)
        assert (entry.actor, entry.origin, entry.origin_detail) == ("demo-admin", "cli", shell())
