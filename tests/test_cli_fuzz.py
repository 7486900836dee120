"""A property-based fuzz of every ``saga`` command: hostile arguments are refused, cleanly.

The commands are read from the ``saga`` group itself (:data:`console.cli.main`,
the installed script), so a new command or option is fuzzed without touching
this file. For each command:

- every argument and option gets each value of :data:`CORE` (a NUL, a lone
  surrogate as a shell hands undecodable bytes on, ``²``, 5,000 digits, a number
  past a bigint, a negative one, a malformed cursor, CR/LF, 100 kB), the others
  plausible (a real saga id, the version it is at): hypothesis's explicit
  examples, so every run tries each;
- :data:`EXAMPLES` more command lines are drawn, each parameter left out,
  plausible or hostile (:data:`tests.helpers.hostile.hostile_text`).

Every run must end with exit code 0, 2 (bad input), 3 (not found) or 4
(conflict), never 1 or an exception; a failure is one line on standard error
with no traceback; and a command that failed wrote nothing (the store's tables
are compared before and after). The commands that run until stopped (worker,
sweeper, participant, console, demo) are fuzzed up to the point where they would
start: their options are parsed, then a stub stands in for the process.

Derandomized with no example database, as the console's fuzz
(tests/console/test_console_fuzz.py) and for the same reasons; it runs on
SQLite and on PostgreSQL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from console.cli import main
from engine import SagaEngine, Settings
from engine.bulk.model import BulkFilter
from engine.interventions import Action
from tests.console.console_sagas import SAGAS
from tests.console.support import dead_lettered
from tests.helpers.hostile import CORE, hostile_text
from tests.helpers.snapshot import StoreSnapshot

#: Drawn command lines per command, beside the explicit CORE ones.
EXAMPLES = int(os.environ.get("SAGA_FUZZ_EXAMPLES", "6"))
#: Exit codes of a command that did its work or refused (docs/cli.md).
CLEAN_EXITS = frozenset({0, 2, 3, 4})
#: Commands that run until stopped: only their parsing is fuzzed.
RUN_UNTIL_STOPPED = frozenset({"worker", "sweeper", "participant", "console", "demo"})
APP = "tests.console.console_sagas"
#: The key of the group's ``-A`` value in a :class:`Line`.
APPS = "-A"
PASSWORD = "correct horse battery"
#: :data:`tests.helpers.hostile.CORE` as a command line carries it: text, with lone
#: surrogates where a shell hands on bytes that are not UTF-8 (Python's surrogateescape).
CLI_CORE = (
    *(raw.decode("utf-8", "surrogateescape") for raw in CORE),
    "@/no\x00such.json",  # a @FILE path no file system takes
    "@/dev/null/\udcff",
)


@dataclass(frozen=True)
class Command:
    """A leaf command: the words that name it and its parameters."""

    words: tuple[str, ...]
    command: click.Command

    def __repr__(self) -> str:
        return " ".join(self.words)

    @property
    def params(self) -> list[click.Parameter]:
        return [p for p in self.command.params if p.name != "help"]


def commands(group: click.Group = main, words: tuple[str, ...] = ()) -> list[Command]:
    """Every command under ``group``, by the words that run it."""
    found = []
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found.extend(commands(command, (*words, name)))
        else:
            found.append(Command((*words, name), command))
    return found


@dataclass(frozen=True)
class Line:
    """One command line: the command, and each parameter's value (None: left out)."""

    command: Command
    values: dict[str, str | bool | None]

    def argv(self) -> list[str]:
        # -A is the saga group's own option: fuzzed beside each command's.
        argv = ["-A", str(self.values.get(APPS) or APP), *self.command.words]
        for param in self.command.params:
            value = self.values.get(param.name or "")
            if value is None or value is False:
                continue
            if isinstance(param, click.Argument):
                argv.append(str(value))
            elif isinstance(param, click.Option) and param.is_flag:
                argv.append(max(param.opts, key=len))
            else:
                argv.extend([max(param.opts, key=len), str(value)])
        return argv


def _plausible(param: click.Parameter, good: dict[str, list[str]]) -> list[str]:
    if isinstance(param.type, click.Choice):
        return [str(c) for c in param.type.choices]
    return good.get(param.name or "", ["1"])


def lines(command: Command, good: dict[str, list[str]]) -> st.SearchStrategy[Line]:
    """Command lines for ``command``: arguments always given, options left out or not."""
    apps = st.one_of(st.just(APP), hostile_text)
    values: dict[str, st.SearchStrategy[str | bool | None]] = {APPS: st.none() | apps}
    for param in command.params:
        name = param.name or ""
        if isinstance(param, click.Option) and param.is_flag:
            values[name] = st.booleans()
            continue
        given_value = st.one_of(hostile_text, st.sampled_from(_plausible(param, good)))
        values[name] = given_value if isinstance(param, click.Argument) else st.none() | given_value
    return st.builds(Line, command=st.just(command), values=st.fixed_dictionaries(values))


def core_lines(command: Command, good: dict[str, list[str]]) -> list[Line]:
    """Each parameter of ``command`` with each :data:`CLI_CORE` value, the others plausible
    (arguments given, options left out)."""
    base: dict[str, str | bool | None] = {}
    for param in command.params:
        if isinstance(param, click.Argument):
            base[param.name or ""] = _plausible(param, good)[0]
    found = []
    for bad in CLI_CORE:
        found.append(Line(command, {**base, APPS: bad}))
        for param in command.params:
            if isinstance(param, click.Option) and param.is_flag:
                continue
            found.append(Line(command, {**base, param.name or "": bad}))
    return found


# -- the store under fuzz -------------------------------------------------------------


@dataclass
class Fuzzed:
    url: str
    snapshot: StoreSnapshot
    good: dict[str, list[str]]

    def check(self, line: Line) -> None:
        before = self.snapshot.take()
        env = {"SAGA_DATABASE_URL": self.url, "SAGA_APP": "", "USER": "tester"}
        # Answers for a prompt (saga user add asks for the password twice).
        answers = f"{PASSWORD}\n{PASSWORD}\n"
        result = CliRunner().invoke(main, line.argv(), env=env, input=answers)
        shown = f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
        assert result.exception is None or isinstance(result.exception, SystemExit), shown
        assert result.exit_code in CLEAN_EXITS, shown
        # Standard output may show a step's stored traceback (saga show); errors never do.
        assert "Traceback" not in result.stderr
        if result.exit_code != 0:
            message = result.stderr.strip()
            assert message.startswith("saga: error: ") and "\n" not in message, message
            assert self.snapshot.take() == before, "a failed command wrote to the store"


@pytest.fixture
def fuzzed(store_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fuzzed]:
    for command in commands():
        if command.words[-1] in RUN_UNTIL_STOPPED:
            monkeypatch.setattr(command.command, "callback", _parsed_only)
    engine = SagaEngine(SAGAS, settings=Settings(database_url=store_url, worker_id="t"))
    snapshot = StoreSnapshot(store_url)
    try:
        yield Fuzzed(store_url, snapshot, _plausible_values(engine))
    finally:
        snapshot.close()
        engine.close()


def _parsed_only(*args: Any, **kwargs: Any) -> None:
    """Stands in for a command that would run until stopped: its input was parsed."""


def _plausible_values(engine: SagaEngine) -> dict[str, list[str]]:
    failed = dead_lettered(engine, "CLI-1")
    engine.run("hostile")
    bulk, hostile = engine.bulk_recovery(), BulkFilter(saga_name="hostile")
    count = bulk.dry_run(Action.CANCEL, hostile).count
    op = bulk.create(Action.CANCEL, hostile, actor="al", reason="r", expected_count=count)
    return {
        "saga_id": [failed.id],
        "operation_id": [op.id],
        "name": ["order", "fuzz-target"],
        "event": ["approved"],
        "reason": ["outage over (INC-1234)"],
        "actor": ["al"],
        "sent_by": ["al"],
        "expected_version": [str(failed.version)],
        "expected": [str(count)],
        "payload": ['{"amount": 7}'],
        "data": ['{"ok": true}'],
        "limit": ["10"],
        "cursor": [f"{failed.created_at}_{failed.id}"],
        "state": ["failed"],
        "saga_name": ["order"],
        "step_name": ["ship"],
        "search": ["CLI-1"],
        "error_text": ["carrier"],
        "time_from": ["2020-01-01"],
        "time_to": ["2999-01-01T00:00"],
        "password": [PASSWORD],
        "batch_size": ["10"],
        "rate": ["100"],
        "max_failure_rate": ["20"],
        "correlation_id": ["corr-1"],
        "business_key": ["CLI-2"],
        "idempotency_key": ["idem-1"],
        "host": ["127.0.0.1"],
        "port": ["0"],
        "metrics_port": ["0"],
        "concurrency": ["2"],
        "services": ["svc"],
        "seed": ["7"],
        "duration": ["1"],
        "console_host": ["127.0.0.1"],
        "console_port": ["0"],
    }


# -- the fuzz ---------------------------------------------------------------------------------


def fuzz_command(fuzzed: Fuzzed, command: Command) -> None:
    def hostile_line(line: Line) -> None:
        fuzzed.check(line)

    for line in core_lines(command, fuzzed.good):
        hostile_line = example(line=line)(hostile_line)
    run = settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )(given(line=lines(command, fuzzed.good))(hostile_line))
    run()


def test_the_commands_are_read_from_the_group() -> None:
    names = {" ".join(c.words) for c in commands()}
    assert {"list", "show", "retry", "bulk run", "user add", "worker", "db upgrade"} <= names
    assert {c.words[-1] for c in commands()} >= RUN_UNTIL_STOPPED


def test_every_command_refuses_hostile_arguments_cleanly(fuzzed: Fuzzed) -> None:
    for command in commands():
        fuzz_command(fuzzed, command)
