"""Hostile arguments to ``saga`` commands: exit 2 naming what was wrong, nothing written.

Each case is one the fuzz (tests/test_cli_fuzz.py) found, or one of the kinds
the console's doors refuse: a NUL, a lone surrogate (what a shell hands on for
bytes that are not UTF-8), digits that ``int()`` takes or refuses oddly (``٣``,
``²``), and numbers past its 4,300-digit limit. Before, these ended in a
traceback, an exit 1 ("unexpected error"), or a database error.
"""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner, Result

from console.cli import main
from tests.test_cli import assert_refused, row_counts

BIG = "1" * 5000
SURROGATE = b"\xff".decode("utf-8", "surrogateescape")  # `saga show $'\xff'`
SAGA_ID = "01900000-0000-7000-8000-000000000000"


@pytest.fixture
def saga(store_url: str) -> Any:
    def invoke(*args: str) -> Result:
        env = {"SAGA_DATABASE_URL": store_url, "SAGA_APP": "", "USER": "tester"}
        return CliRunner().invoke(main, ["-A", "tests.console.console_sagas", *args], env=env)

    return invoke


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["list", "--limit", "²"], ["invalid --limit", "not a whole number from 1 to 500"]),
        (["list", "--limit", "٣"], ["invalid --limit"]),  # int() would read it as 3
        (["list", "--limit", BIG], ["invalid --limit"]),
        (["deadletters", "--limit", "1_0"], ["invalid --limit"]),
        (["retry", SAGA_ID, "--reason", "r", "--expected-version", "²"], ["--expected-version"]),
        (["cancel", SAGA_ID, "--reason", "r", "--expected-version", BIG], ["--expected-version"]),
        (["bulk", "run", "retry", "--saga", "order", "--expect", "²"], ["invalid --expect"]),
        (["bulk", "run", "retry", "--saga", "order", "--batch-size", "٣"], ["--batch-size"]),
        (["worker", "--concurrency", "²"], ["invalid --concurrency"]),
        (["console", "--port", BIG], ["invalid --port"]),
        (["demo", "--seed", "²"], ["invalid --seed"]),
        (["show", SURROGATE], ["invalid saga id", "lone surrogate"]),
        (["show", "x\x00"], ["invalid saga id", "NUL"]),
        (["retry", SURROGATE, "--reason", "r"], ["invalid saga id"]),
        (["signal", SURROGATE, "approved"], ["invalid saga id"]),
        (["bulk", "show", "x\x00"], ["invalid operation id", "NUL"]),
        (["bulk", "stop", SAGA_ID, "--actor", SURROGATE], ["invalid --actor", "surrogate"]),
        (["list", "--saga", "order\x00"], ["invalid saga name", "NUL"]),
        (["list", "--search", SURROGATE], ["invalid search", "surrogate"]),
        (["deadletters", "--step", "ship\x00"], ["invalid step name", "NUL"]),
        (["bulk", "dry-run", "retry", "--error", "x\x00"], ["invalid error text", "NUL"]),
        (["edit-retry", SAGA_ID, "--reason", "r", "--payload", BIG], ["too many digits"]),
        (["edit-retry", SAGA_ID, "--reason", "r", "--payload", "[" * 100_000], ["too deeply"]),
        (["start", "order", "--payload", "@/tmp/x\x00.json"], ["--payload", "cannot read"]),
        (["user", "add", "²", "--password", "correct horse battery"], ["invalid user name"]),
        (["user", "add", "al", "--password", f"correct horse {SURROGATE}"], ["--password"]),
        (["user", "disable", SURROGATE], ["invalid name", "surrogate"]),
        (["user", "set-role", "al\x00", "admin"], ["invalid name", "NUL"]),
    ],
)
def test_hostile_arguments_exit_2_naming_the_problem_and_write_nothing(
    args: list[str], fragments: list[str], saga: Any, store_url: str
) -> None:
    before = row_counts(store_url)

    result = saga(*args)

    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert_refused(result, 2, *fragments)
    assert row_counts(store_url) == before
