"""The wheel is the product (DESIGN.md, principle 11): build it, install it, run it elsewhere.

The wheel test builds the sdist, then the wheel from the sdist with no npm on
``PATH``, and installs the wheel into a fresh virtualenv in a temporary
directory. There, with the checkout neither on ``sys.path`` nor the working
directory, it runs what docs/deploying.md runs, by the commands of the units in
``deploy/`` (their paths mapped to this test's installation):

- ``saga db upgrade`` on a new PostgreSQL database (saga-db-upgrade.service);
- ``saga demo`` on SQLite;
- a worker (saga-worker@.service) and ``saga sweeper --once`` run an example saga to
  completion, on PostgreSQL and Redis;
- gunicorn with deploy/gunicorn.conf.py (saga-console.service), two workers, serves the
  sign-in page, the saga's page to a signed-in operator, and htmx.

The other test checks the units with ``systemd-analyze verify``.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest
import sqlalchemy as sa

from tests.conftest import IN_CI, PG_ADMIN_URL, _missing

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
HTMX_VERSION = json.loads((ROOT / "package-lock.json").read_text())["packages"][
    "node_modules/htmx.org"
]["version"]
APP = "engine.examples.travel_booking"
PASSWORD = "wheel-test-password"

#: Where docs/deploying.md installs what the units name (the venv, the gunicorn settings).
PRODUCTION_VENV_BIN = "/opt/saga/venv/bin/"
PRODUCTION_GUNICORN_CONF = "/etc/saga/gunicorn.conf.py"


# -- the units --------------------------------------------------------------------------


def test_the_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if IN_CI:
            pytest.fail("systemd-analyze is missing: .ci/run installs Debian's systemd package")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    units = sorted(DEPLOY.glob("*.service"))
    assert {u.name for u in units} >= {
        "saga-db-upgrade.service",
        "saga-worker@.service",
        "saga-sweeper.service",
        "saga-console.service",
    }
    # verify checks that each command exists: point them at this virtualenv's.
    here = f"{Path(sys.executable).parent}/"
    for unit in units:
        text = unit.read_text().replace(PRODUCTION_VENV_BIN, here)
        (tmp_path / unit.name).write_text(text)
    done = subprocess.run(
        [tool, "verify", *(str(tmp_path / u.name) for u in units)],
        capture_output=True,
        text=True,
        check=False,
    )
    # It only warns (exit 0) about unknown keys: any output at all is a failure.
    assert done.returncode == 0 and not done.stdout + done.stderr, done.stdout + done.stderr


def unit_command(unit: str, venv: Path, instance: str = "") -> list[str]:
    """The unit's ``ExecStart=``, with this test's paths for production's and ``%i`` filled."""
    lines = (DEPLOY / unit).read_text().splitlines()
    command = next(line for line in lines if line.startswith("ExecStart="))
    command = command.removeprefix("ExecStart=").replace("%i", instance)
    command = command.replace(PRODUCTION_VENV_BIN, f"{venv}/bin/")
    return shlex.split(command.replace(PRODUCTION_GUNICORN_CONF, str(DEPLOY / "gunicorn.conf.py")))


# -- the wheel, installed outside the checkout ---------------------------------------------


class Outside:
    """A virtualenv with the wheel installed, and a working directory, both outside ROOT."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.venv = base / "venv"
        self.cwd = base / "run"
        self.cwd.mkdir()
        self.timings: dict[str, float] = {}
        self._logs: list[IO[str]] = []
        self._procs: list[subprocess.Popen[str]] = []

    def env(self, **settings: str) -> dict[str, str]:
        """The environment of a process on a production host: nothing of the checkout's."""
        kept = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SAGA_", "PYTHON", "PROMETHEUS_", "VIRTUAL_ENV", "GUNICORN"))
            and k != "WEB_CONCURRENCY"
        }
        kept["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**kept, **settings}

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 60) -> str:
        """Run to completion in the working directory: its standard output, or a failure."""
        done = subprocess.run(
            argv,
            cwd=self.cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{shlex.join(argv)} exited {done.returncode}:\n{output}"
        return done.stdout

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        log = (self.base / f"{name}.log").open("w")
        self._logs.append(log)
        proc = subprocess.Popen(
            argv, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
        )
        self._procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        """Kill what a failed test left running."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        began = time.monotonic()
        yield
        self.timings[phase] = round(time.monotonic() - began, 1)


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Outside]:
    made = Outside(tmp_path)
    yield made
    made.close()


@pytest.fixture
def new_pg_url(worker_id: str) -> Iterator[str]:
    """An empty PostgreSQL database: `saga db upgrade` is to create the schema."""
    name = f"saga_wheel_{worker_id}{os.environ.get('SAGA_TEST_DB_SUFFIX', '')}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    drop = sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    try:
        with admin.connect() as conn:
            conn.execute(drop)
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        _missing("PostgreSQL", exc.orig)
    url = sa.make_url(PG_ADMIN_URL).set(drivername="postgresql", database=name)
    yield url.render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(drop)
    admin.dispose()


@pytest.mark.slow
@pytest.mark.usefixtures("client")  # deletes the test's Redis keys afterwards
def test_the_wheel_runs_outside_the_checkout(
    outside: Outside, new_pg_url: str, redis_url: str, prefix: str
) -> None:
    with outside.timed("build sdist, then the wheel from it"):
        wheel = build_wheel(outside)
    with outside.timed("fresh venv + install"):
        install(outside, wheel)
    check_installed_from_the_wheel(outside)

    began = time.monotonic()
    # The demo runs on SQLite meanwhile (alone, it takes as long as the rest).
    demo = outside.start("demo", demo_command(outside), outside.env(**sqlite(outside)))
    production = outside.env(
        SAGA_DATABASE_URL=new_pg_url,
        SAGA_REDIS_URL=redis_url,
        SAGA_REDIS_PREFIX=prefix,
        SAGA_APP=APP,
        SAGA_CONSOLE_SECRET_KEY="shared-by-every-gunicorn-worker",
        SAGA_POLL_SECONDS="0.2",
    )
    with outside.timed("saga db upgrade"):
        outside.run(unit_command("saga-db-upgrade.service", outside.venv), production)
    saga = str(outside.venv / "bin" / "saga")
    add_user = [saga, "user", "add", "ops", "--role", "operator", "--password", PASSWORD]
    outside.run(add_user, production)
    with serving_console(outside, production) as console_url:
        with outside.timed("worker + sweeper --once: an example saga completes"):
            saga_id = run_a_saga(outside, production)
        with outside.timed("console: sign in, instance page, htmx"):
            check_console(console_url, saga_id)
    demo_output = finish(demo, outside, "demo", timeout=60)
    assert re.search(r"\[done\] started \d+ .* completed [1-9]", demo_output), demo_output
    outside.timings["running it all (demo in parallel)"] = round(time.monotonic() - began, 1)
    print(f"wheel check timings (s): {outside.timings}")


def build_wheel(outside: Outside) -> Path:
    dist = outside.base / "dist"
    build = [sys.executable, "-m", "build", "--outdir", str(dist)]
    outside.run([*build, "--sdist", str(ROOT)], outside.env(), timeout=120)
    (sdist,) = dist.glob("*.tar.gz")
    # The sdist carries htmx: the wheel builds from it with no npm anywhere on PATH.
    no_npm = outside.base / "no-npm"
    no_npm.mkdir()
    outside.run([*build, "--wheel", str(sdist)], {**outside.env(), "PATH": str(no_npm)}, 120)
    with tarfile.open(sdist) as archive:
        assert f"saga_engine-{VERSION}/static/vendor/htmx.min.js" in archive.getnames()
    (wheel,) = dist.glob("*.whl")
    return wheel


def install(outside: Outside, wheel: Path) -> None:
    outside.run([sys.executable, "-m", "venv", "--without-pip", str(outside.venv)], outside.env())
    # This checkout's pip installs into the new venv (--python): the same packages as the
    # venv's own pip would, without bootstrapping one. Downloads come from pip's cache.
    pip = [sys.executable, "-m", "pip", "--python", str(outside.venv / "bin" / "python")]
    outside.run([*pip, "install", "--quiet", str(wheel)], outside.env(), timeout=300)


def check_installed_from_the_wheel(outside: Outside) -> None:
    probe = (
        "import importlib.util, json, console, engine\n"
        "print(json.dumps([console.__file__, str(console.TEMPLATES.resolve()),"
        " str(console.HTMX.resolve()), engine.__file__, engine.__version__,"
        " importlib.util.find_spec('examples') is None]))"
    )
    python = str(outside.venv / "bin" / "python")
    found = json.loads(outside.run([python, "-c", probe], outside.env()))
    *files, version, no_examples = found
    site = str(outside.venv / "lib")
    assert all(file.startswith(site) for file in files), found
    assert version == VERSION
    assert no_examples, "the wheel installs a top-level `examples` package"


def sqlite(outside: Outside) -> dict[str, str]:
    return {"SAGA_DATABASE_URL": f"sqlite:///{outside.cwd / 'demo.db'}"}


def demo_command(outside: Outside) -> list[str]:
    saga = str(outside.venv / "bin" / "saga")
    return [saga, "demo", "--duration", "3", "--rate", "8", "--seed", "1", "--console-port", "0"]


def run_a_saga(outside: Outside, env: dict[str, str]) -> str:
    saga = str(outside.venv / "bin" / "saga")
    payload = json.dumps({"traveller": "Ada", "fail": {"flight": "flaky:1"}})
    started = outside.run([saga, "start", "book_trip", "--payload", payload, "--json"], env)
    saga_id = str(json.loads(started)["instance"]["id"])
    metrics_port = free_port()
    worker = outside.start(
        "worker",
        unit_command("saga-worker@.service", outside.venv, str(metrics_port)),
        {**env, "SAGA_WORKER_ID": f"wheel-worker-{metrics_port}"},
    )
    try:
        sweeper = unit_command("saga-sweeper.service", outside.venv)
        swept = json.loads(outside.run([*sweeper, "--once"], env))  # what each sweep did
        assert isinstance(swept, dict) and swept, swept
        state = wait_for_state(outside, env, saga_id, "completed")
        assert state == "completed", outside.log("worker")
        scrape = get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert 'saga_completed_total{saga="book_trip"} 1.0' in scrape.body
    finally:
        worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, outside.log("worker")  # SIGTERM drains, then exits 0
    return saga_id


def wait_for_state(outside: Outside, env: dict[str, str], saga_id: str, wanted: str) -> str:
    saga = str(outside.venv / "bin" / "saga")
    give_up = time.monotonic() + 30
    state = ""
    while state != wanted and time.monotonic() < give_up:
        shown = json.loads(outside.run([saga, "show", saga_id, "--json"], env))
        state = shown["instance"]["state"]
        time.sleep(0.2)
    return state


@contextmanager
def serving_console(outside: Outside, env: dict[str, str]) -> Iterator[str]:
    """gunicorn as saga-console.service runs it, on a free port; yields its URL."""
    port = free_port()
    metrics_dir = outside.base / "console-metrics"  # the unit's RuntimeDirectory
    server = outside.start(
        "gunicorn",
        unit_command("saga-console.service", outside.venv),
        {
            **env,
            "SAGA_CONSOLE_BIND": f"127.0.0.1:{port}",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/healthz", server, outside)
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(30)
    assert code == 0, outside.log("gunicorn")  # SIGTERM: a graceful stop
    booted = re.findall(r"Booting worker with pid", outside.log("gunicorn"))
    assert len(booted) == 2, outside.log("gunicorn")


def check_console(url: str, saga_id: str) -> None:
    browser = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    login = get(f"{url}/login", browser)
    assert login.status == 200 and login.content_type == "text/html", login
    token = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', login.body)
    assert token, login.body
    form = {"name": "ops", "password": PASSWORD, "csrf_token": token.group(1)}
    signed_in = get(f"{url}/login", browser, data=form)
    assert signed_in.url != f"{url}/login", "the sign-in was refused"
    page = get(f"{url}/sagas/{saga_id}", browser)
    assert page.status == 200 and page.content_type == "text/html"
    assert saga_id in page.body and "completed" in page.body
    assert f"saga-engine {VERSION}</footer>" in page.body
    assert "/static/vendor/htmx.min.js" in page.body
    htmx = get(f"{url}/static/vendor/htmx.min.js")
    # text/javascript (RFC 9239); older mime.types files still say application/javascript.
    assert htmx.status == 200
    assert htmx.content_type in ("text/javascript", "application/javascript"), htmx
    assert f'version:"{HTMX_VERSION}"' in htmx.body


class Fetched:
    def __init__(self, url: str, status: int, content_type: str, body: str) -> None:
        self.url = url
        self.status = status
        self.content_type = content_type
        self.body = body

    def __repr__(self) -> str:
        return f"<{self.status} {self.content_type} {self.url}: {self.body[:300]!r}>"


def get(
    url: str,
    opener: urllib.request.OpenerDirector | None = None,
    data: dict[str, str] | None = None,
) -> Fetched:
    """GET (or POST ``data``), following redirects."""
    encoded = urllib.parse.urlencode(data).encode() if data is not None else None
    opened = (opener or urllib.request.build_opener()).open(url, encoded, timeout=10)
    with opened as response:
        content_type = response.headers.get_content_type()
        body = response.read().decode()
        return Fetched(response.url, response.status, content_type, body)


def wait_until_up(url: str, server: subprocess.Popen[str], outside: Outside) -> None:
    give_up = time.monotonic() + 30
    while True:
        try:
            get(url)
            return
        except OSError as exc:
            if server.poll() is not None or time.monotonic() > give_up:
                raise AssertionError(f"{url}: {exc}\n{outside.log('gunicorn')}") from exc
            time.sleep(0.1)


def finish(proc: subprocess.Popen[str], outside: Outside, name: str, timeout: float) -> str:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{name} ran too long:\n{outside.log(name)}") from None
    assert code == 0, f"{name} exited {code}:\n{outside.log(name)}"
    return outside.log(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
