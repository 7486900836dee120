"""A property-based fuzz of every console route: hostile input never gets a 5xx.

Routes come from the app's ``url_map``, so a new route is fuzzed without
touching this file; the query and form fields of each are the ones its views
read while plausible requests are sent to it first (the request notes every
name looked up), so a new parameter is fuzzed too. Then, for each route and
method:

- every field and path parameter gets each value of
  :data:`tests.helpers.hostile.CORE` (a NUL, a lone surrogate, ``²``, 5,000
  digits, a number past a bigint, a negative one, a malformed cursor, CR/LF,
  100 kB), the others plausible, as an admin: hypothesis's explicit examples,
  so every run tries every one of them;
- :data:`EXAMPLES` more requests are drawn: as viewer, operator, admin or
  signed out, from htmx or not, with a valid CSRF token (mostly), each field
  left out, plausible (a real saga id, the version it is at) or hostile
  (:data:`tests.helpers.hostile.hostile_octets`).

Every response must be below 500, show no traceback of the console's, and log
no ERROR; a refused request (400, 403, 404, 405, 409) must have written
nothing: the store's tables are compared before and after.

The draws are derandomized (and hypothesis keeps no example database): every
run, in CI and locally, sends the same requests, so a failure in CI is
reproduced by running the test again, and CI never turns red on a new draw
unrelated to the change under test. What a random seed would add is new
exploration on each run; ``SAGA_FUZZ_EXAMPLES=300`` explores further by hand.
The bound keeps the test to about 15 s on SQLite and 30 s on PostgreSQL.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import pytest
from flask import Flask, Request
from flask.testing import FlaskClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import ImmutableMultiDict
from werkzeug.routing import AnyConverter, Rule
from werkzeug.test import TestResponse

import console.deadletters
import console.sagas
from engine import SagaEngine, Settings
from engine.bulk.model import BulkFilter
from engine.interventions import Action
from engine.model import Instance
from engine.states import SagaState
from tests.console.console_sagas import SAGAS
from tests.console.support import PASSWORD, ROLES, dead_lettered, make_app
from tests.console.test_console_signal import EVENT, approve
from tests.helpers.hostile import CORE, hostile_octets, octets, percent
from tests.helpers.snapshot import StoreSnapshot

#: Drawn requests per route and method (34 of them), beside the explicit CORE ones.
EXAMPLES = int(os.environ.get("SAGA_FUZZ_EXAMPLES", "6"))
#: Statuses that say nothing was done: each must leave the store as it was.
REFUSALS = frozenset({400, 403, 404, 405, 409})
TARGET_USER = "fuzz-target"
_STORED_TRACEBACK = re.compile(r'<pre class="traceback">.*?</pre>', re.DOTALL)
_TOKEN = re.compile(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"')


# -- what to send -------------------------------------------------------------------

#: The query and form fields the views read during the request being sent.
_READ: dict[str, set[str]] = {"args": set(), "form": set()}


class _ReadArgs(ImmutableMultiDict[str, str]):
    """A request's query or form fields that note which names the views read."""

    kind = "args"

    def __getitem__(self, key: str) -> str:
        _READ[self.kind].add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None, type: Any = None) -> Any:
        _READ[self.kind].add(key)
        return super().get(key, default, type)

    def getlist(self, key: str, type: Any = None) -> list[Any]:
        _READ[self.kind].add(key)
        return super().getlist(key, type)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            _READ[self.kind].add(key)
        return super().__contains__(key)


class _ReadForm(_ReadArgs):
    kind = "form"


class ReadingRequest(Request):
    """Notes the fields the views read; mixed into the console's own request class."""

    @property
    def args(self) -> ImmutableMultiDict[str, str]:
        return _ReadArgs(super().args)

    @property
    def form(self) -> ImmutableMultiDict[str, str]:
        return _ReadForm(super().form)


@dataclass(frozen=True)
class Route:
    """A route and method, and the fields its views read (found by sending plausible requests)."""

    rule: Rule
    method: str
    args: tuple[str, ...]
    form: tuple[str, ...]

    def __repr__(self) -> str:
        return f"{self.method} {self.rule.rule}"


@dataclass(frozen=True)
class Case:
    """One request: who sends it, where, and with what."""

    route: Route
    role: str
    path: dict[str, bytes]
    query: dict[str, bytes]
    form: dict[str, bytes] = field(default_factory=dict)
    with_token: bool = True
    htmx: bool = False

    def url(self) -> str:
        path = self.route.rule.rule
        for name, value in self.path.items():
            path = re.sub(rf"<(?:[^:<>]+:)?{name}>", percent(value), path)
        return f"{path}?{encode(self.query)}" if self.query else path


def encode(fields: dict[str, bytes]) -> str:
    """``fields`` as a query string or a form body, every value percent-encoded as it is."""
    return "&".join(f"{percent(octets(k))}={percent(v)}" for k, v in fields.items())


@dataclass
class Plausible:
    """Values that reach past the first check: real ids, the versions they are at."""

    fields: dict[str, list[str]]
    path: dict[str, list[str]]

    def field(self, name: str) -> list[str]:
        return self.fields.get(name, ["", "1", "order", "failed", "retry"])

    def path_values(self, rule: Rule, name: str) -> list[str]:
        converter = rule._converters[name]
        if isinstance(converter, AnyConverter):
            return sorted(converter.items)
        return self.path.get(name, ["x"])


def cases(route: Route, plausible: Plausible) -> st.SearchStrategy[Case]:
    """Requests to ``route``: each field it reads is left out, plausible, or hostile."""

    def value(good: list[str]) -> st.SearchStrategy[bytes]:
        return st.one_of(hostile_octets, st.sampled_from(good).map(octets))

    def fields(names: tuple[str, ...]) -> st.SearchStrategy[dict[str, bytes]]:
        return st.fixed_dictionaries({}, optional={n: value(plausible.field(n)) for n in names})

    rule = route.rule
    return st.builds(
        Case,
        route=st.just(route),
        role=st.sampled_from([*ROLES, "anon"]),
        path=st.fixed_dictionaries(
            {n: value(plausible.path_values(rule, n)) for n in sorted(rule.arguments)}
        ),
        query=fields(route.args),
        form=fields(route.form) if route.method == "POST" else st.just({}),
        with_token=st.integers(0, 9).map(bool),
        htmx=st.booleans(),
    )


def core_cases(route: Route, plausible: Plausible) -> list[Case]:
    """Each field and path parameter of ``route`` with each :data:`CORE` value in turn,
    the others plausible, sent by an admin (who may reach every view)."""
    rule = route.rule
    path = {n: octets(plausible.path_values(rule, n)[0]) for n in sorted(rule.arguments)}
    query = {n: octets(plausible.field(n)[0]) for n in route.args}
    form = {n: octets(plausible.field(n)[0]) for n in route.form if n != "csrf_token"}
    if route.method != "POST":
        form = {}
    found = []
    for bad in CORE:
        for name in path:
            found.append(Case(route, "admin", {**path, name: bad}, query, form))
        for name in query:
            found.append(Case(route, "admin", path, {**query, name: bad}, form))
        for name in form:
            found.append(Case(route, "admin", path, query, {**form, name: bad}))
    return found


# -- the console under fuzz -----------------------------------------------------------


class ErrorLog(logging.Handler):
    """Keeps every ERROR (or worse) record logged while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Fuzzed:
    """The app, a client per role with its CSRF token, and what to compare."""

    app: Flask
    engine: SagaEngine
    snapshot: StoreSnapshot
    errors: ErrorLog
    plausible: Plausible = field(default_factory=lambda: Plausible({}, {}))
    clients: dict[str, tuple[FlaskClient, str]] = field(default_factory=dict)
    seen: dict[int, int] = field(default_factory=dict)

    def sign_in_everyone(self) -> None:
        users = self.app.extensions["saga"].users
        for role in ROLES:
            users.set_role(role, role, actor="fuzz")
            users.set_disabled(role, False, actor="fuzz")
            self.clients[role] = self._signed_in(role)
        anon = self.app.test_client()
        self.clients["anon"] = (anon, _token(anon.get("/login")))

    def _signed_in(self, role: str) -> tuple[FlaskClient, str]:
        client = self.app.test_client()
        token = _token(client.get("/login"))
        response = client.post(
            "/login", data={"name": role, "password": PASSWORD, "csrf_token": token}
        )
        assert response.status_code == 302, response.get_data(as_text=True)
        return client, _token(client.get("/sagas"))

    def routes(self) -> list[Route]:
        """Every route and method of the app, with the fields its views read."""
        pairs = [
            (rule, method)
            for rule in self.app.url_map.iter_rules()
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})
        ]
        pairs.sort(key=lambda pair: (pair[0].rule, pair[1]))
        return [self._discover(rule, method) for rule, method in pairs]

    def _discover(self, rule: Rule, method: str) -> Route:
        # Plausible requests (bare and with every plausible field, as each role, from htmx
        # and not, with each plausible path value): the fields their views read.
        for kind in _READ.values():
            kind.clear()
        every = {n: octets(values[0]) for n, values in self.plausible.fields.items()}
        for path in self._plausible_paths(rule):
            for role, sent, htmx in product(ROLES, ({}, every), (False, True)):
                form = sent if method == "POST" else {}
                bare = Route(rule, method, (), ())
                self.send(Case(bare, role, path, sent, form, htmx=htmx)).close()
                self._join_bulk_runners()
        route = Route(rule, method, tuple(sorted(_READ["args"])), tuple(sorted(_READ["form"])))
        self.sign_in_everyone()  # the requests may have signed a client out
        return route

    def _plausible_paths(self, rule: Rule) -> list[dict[str, bytes]]:
        # Every plausible value of each path parameter at least once (not every combination).
        values = {n: self.plausible.path_values(rule, n) for n in sorted(rule.arguments)}
        longest = max((len(v) for v in values.values()), default=1)
        return [{n: octets(v[i % len(v)]) for n, v in values.items()} for i in range(longest)]

    def send(self, case: Case) -> TestResponse:
        client, token = self.clients[case.role]
        headers = {"HX-Request": "true"} if case.htmx else {}
        if case.route.method == "GET":
            return client.get(case.url(), headers=headers)
        form = dict(case.form)
        if case.with_token:
            form["csrf_token"] = token.encode()
        return client.post(
            case.url(),
            data=encode(form),
            content_type="application/x-www-form-urlencoded",
            headers=headers,
        )

    def check(self, case: Case) -> None:
        before = self.snapshot.take()
        self.errors.records.clear()
        response = self.send(case)
        self._join_bulk_runners()
        status = response.status_code
        self.seen[status] = self.seen.get(status, 0) + 1
        body = response.get_data(as_text=True)
        response.close()  # a static file is sent from an open file
        assert status < 500, body[:2000]
        # A step's stored traceback is shown on purpose (escaped); the console's own never.
        assert "Traceback (most recent call last)" not in _STORED_TRACEBACK.sub("", body)
        assert not self.errors.records, [r.getMessage() for r in self.errors.records]
        if status in REFUSALS:
            assert self.snapshot.take() == before, f"{status} but the store changed"
        if case.route.rule.endpoint.startswith("auth."):
            self.sign_in_everyone()  # a sign-out, a role change or a sign-in as someone else

    def _join_bulk_runners(self) -> None:
        # A bulk operation the fuzz started runs in a thread; it must not write mid-comparison.
        for thread in self.app.extensions["saga"].bulk.runner_threads:
            thread.join(30)


def _token(response: TestResponse) -> str:
    found = _TOKEN.search(response.get_data(as_text=True))
    assert found is not None, "no CSRF token on the page"
    return found.group(1)


@pytest.fixture
def fuzzed(store_url: str) -> Iterator[Fuzzed]:
    settings_ = Settings(database_url=store_url, worker_id="test-worker", poll_seconds=0.05)
    engine = SagaEngine([*SAGAS, approve], settings=settings_)
    app = make_app(engine, WTF_CSRF_ENABLED=True, SAGA_LOGIN_MAX_FAILURES=10**9)
    # The console's request class (htmx-flask's), noting the fields read; nothing else changes.
    app.request_class = type("Reading", (ReadingRequest, app.request_class), {})
    app.extensions["saga"].users.add(TARGET_USER, PASSWORD, "viewer")
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    snapshot = StoreSnapshot(store_url)
    try:
        made = Fuzzed(app, engine, snapshot, errors)
        made.sign_in_everyone()
        yield made
    finally:
        logging.getLogger().removeHandler(errors)
        snapshot.close()
        engine.close()


def plausible(engine: SagaEngine, key: str) -> Plausible:
    """Instances of every kind a page shows (their own: requests may act on them), and
    the values that name them."""
    failed = dead_lettered(engine, key)
    done = engine.run("order", {"amount": 1}, business_key=f"{key}-done")
    waiting = engine.run("approve", {"order": key})
    engine.run("hostile")  # dead-lettered too: for a bulk operation
    bulk, hostile = engine.bulk_recovery(), BulkFilter(saga_name="hostile")
    count = bulk.dry_run(Action.CANCEL, hostile).count
    op = bulk.create(Action.CANCEL, hostile, actor="al", reason="r", expected_count=count)
    ids = [failed.id, done.id, waiting.id]
    return Plausible(
        fields=_plausible_fields(failed, ids),
        path={
            "saga_id": ids,
            "action_name": [*(a.value for a in Action), *console.sagas.CHOREO_ACTIONS],
            "choice": list(console.deadletters.CHOICES),
            "event": [EVENT],
            "operation_id": [op.id],
            "name": [TARGET_USER],
            "filename": ["console.css"],
        },
    )


def _plausible_fields(failed: Instance, ids: list[str]) -> dict[str, list[str]]:
    version = str(failed.version)
    return {
        "q": [*ids, "ORD-1"],
        "saga_id": ids,
        "saga": ["order", "approve"],
        "step": ["ship"],
        "state": [*(s.value for s in SagaState), "stuck"],
        "action": [a.value for a in Action],
        "version": [version],
        "v": [version],
        "expected_version": [version],
        "reason": ["outage over (INC-1234)"],
        "payload": ['{"amount": 7}'],
        "signal_data": ['{"approved": true}', ""],
        "cursor": [f"{failed.created_at}_{failed.id}"],
        "before": ["1", f"{failed.created_at}_1"],
        "from": ["2020-01-01"],
        "to": ["2999-01-01T00:00"],
        "time_field": ["created", "updated"],
        "expected_count": ["1", "0"],
        "batch_size": ["10"],
        "rate": ["5"],
        "max_failure": ["20"],
        "dry_run": ["1"],
        "outcome": ["applied", "pending"],
        "after": ["0"],
        "limit": ["10"],
        "name": [*ROLES, TARGET_USER],
        "password": [PASSWORD],
        "role": [*ROLES],
        "next": ["/audit"],
        "back": ["instance"],
    }


# -- the fuzz -------------------------------------------------------------------------------


def fuzz_route(fuzzed: Fuzzed, route: Route) -> None:
    """Every :data:`CORE` value in every field of ``route``, then :data:`EXAMPLES` drawn
    requests: roles, fields left out, plausible or hostile, htmx or not, a token or not."""

    def hostile_request(case: Case) -> None:
        fuzzed.check(case)

    for case in core_cases(route, fuzzed.plausible):
        hostile_request = example(case=case)(hostile_request)
    run = settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )(given(case=cases(route, fuzzed.plausible))(hostile_request))
    run()


def test_every_route_answers_hostile_input_without_a_5xx_or_a_write(fuzzed: Fuzzed) -> None:
    fuzzed.plausible = plausible(fuzzed.engine, "FOUND")
    routes = fuzzed.routes()
    assert len(routes) >= 30  # the map was read
    reads = {f"{r}": r.args + r.form for r in routes}
    assert {"q"} <= set(reads["GET /search"]), reads  # the fields were found
    assert {"reason", "expected_version"} <= set(
        reads["POST /sagas/<saga_id>/actions/<action_name>"]
    )
    fuzzed.plausible = plausible(fuzzed.engine, "FUZZ")  # fresh instances for the fuzz
    for route in routes:
        fuzz_route(fuzzed, route)
    # The fuzz reached the views: pages were shown, and input was refused by them.
    assert fuzzed.seen.get(200, 0) > 0 and fuzzed.seen.get(400, 0) > 0, fuzzed.seen
