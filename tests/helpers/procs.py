"""``saga worker`` and ``saga participant`` processes for the crash, drain and chaos tests.

Each process runs the real command line (``python -m engine.cli ...``) with
``SAGA_*`` settings fit for tests, logs to a file of its own, and counts as
ready once its banner is on standard error. Whatever is still running when
the test ends is stopped: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent.parent

#: Settings every process gets unless a test says otherwise: quick polls, short leases.
FAST = {
    "SAGA_POLL_SECONDS": "0.1",
    "SAGA_LEASE_SECONDS": "2",
    "SAGA_REDIS_CLAIM_IDLE_SECONDS": "1",
    "SAGA_CONCURRENCY": "8",
    "SAGA_LOG_LEVEL": "INFO",
}


class Processes:
    """Starts, signals and reaps processes; one log file per process name."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []

    def start(self, name: str, *argv: str, ready: str, **env: str) -> subprocess.Popen[bytes]:
        """Run ``saga ARGV`` as ``name`` and wait until ``ready`` shows on its standard error."""
        settings = {**os.environ, **FAST, **self.env, "SAGA_WORKER_ID": name, **env}
        if not settings.get("SAGA_REDIS_URL"):
            settings.pop("SAGA_REDIS_URL", None)
        log = open(self.log_path(name), "wb")  # noqa: SIM115 - closed in close()
        self._files.append(log)
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *argv],
            cwd=ROOT,
            env=settings,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        self.running[name] = proc
        self.wait_for_line(name, ready)
        return proc

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def wait_for_line(self, name: str, text: str, timeout: float = 30.0) -> None:
        proc = self.running[name]
        give_up = time.monotonic() + timeout
        while text not in self.log(name):
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
            if time.monotonic() > give_up:
                raise AssertionError(f"{name} did not print {text!r}:\n{self.log(name)}")
            time.sleep(0.05)

    def kill(self, name: str) -> None:
        """SIGKILL: no drain, no goodbye."""
        proc = self.running.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def terminate(self, name: str, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code (SIGKILL if it takes longer than ``timeout``)."""
        proc = self.running.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{name} did not exit within {timeout}s of SIGTERM") from None

    def alive(self, name: str) -> bool:
        return self.running[name].poll() is None

    def close(self) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.running.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for file in self._files:
            file.close()


def worker(procs: Processes, name: str, app: str, **env: str) -> subprocess.Popen[bytes]:
    return procs.start(name, "-A", app, "worker", ready="Ctrl-C to stop", **env)


def participant(
    procs: Processes, name: str, app: str, *services: str, **env: str
) -> subprocess.Popen[bytes]:
    argv = [f"--service={s}" for s in services]
    return procs.start(name, "-A", app, "participant", *argv, ready="Ctrl-C to stop", **env)
