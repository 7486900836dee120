"""The console's commands: registered on ``saga``, and the console ``saga demo`` serves."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from console.cli import main
from console.commands import DEMO_ADMIN, serve_demo_console, start_demo_console
from engine import SagaEngine
from engine.users import Role, UserStore


def test_saga_has_the_console_and_user_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert "console" in result.output and "user" in result.output
    assert "--role" in CliRunner().invoke(main, ["user", "add", "--help"]).output


def test_the_demo_console_has_a_fresh_admin_password_each_run(saga_engine: SagaEngine) -> None:
    users = UserStore(saga_engine.store.db)
    server, first = start_demo_console(saga_engine, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"{server.url}/healthz", timeout=10) as response:
            assert response.status == 200
    finally:
        server.stop()
    admin = users.authenticate(DEMO_ADMIN, first)
    assert admin is not None and admin.role is Role.ADMIN
    server, second = start_demo_console(saga_engine, "127.0.0.1", 0)
    server.stop()
    assert second != first
    assert users.authenticate(DEMO_ADMIN, first) is None
    assert users.authenticate(DEMO_ADMIN, second) is not None
    assert users.count() == 1  # the demo creates its admin and nobody else


def test_the_demo_console_moves_off_a_taken_port(
    saga_engine: SagaEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = serve_demo_console(saga_engine, "127.0.0.1", port)
        server.stop()
    out = capsys.readouterr().out
    assert f"port {port} is taken" in out
    assert f"sign in as {DEMO_ADMIN} / " in out
    assert server.port != port


def test_saga_console_says_it_is_the_development_server(sqlite_url: str) -> None:
    saga = str(Path(sys.executable).parent / "saga")
    env = {**os.environ, "SAGA_DATABASE_URL": sqlite_url, "SAGA_APP": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [saga, "console", "--port", "0"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        url = banner.split(" on ")[1].split()[0]
        # Interrupt it only once it serves: the banner and the note come before.
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
            assert response.status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)

    assert proc.returncode == 0, err
    assert banner.startswith("Saga console on http://127.0.0.1:")
    assert "This is the development server" in err
    assert "gunicorn -w 4 -b 0.0.0.0:8000 --graceful-timeout 30 'console:create_app()'" in err
