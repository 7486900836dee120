"""What a ``saga participant`` process tells Prometheus about the commands it handles.

A real worker and a real participant process on Redis and PostgreSQL: one
trip completes, one is refused by the car service and compensated, and a
malformed entry lands on the hotel's command stream. The participant's
``--metrics-port`` must then count each command by how it was answered,
time its handlers and its queueing, count the malformed entry, and pass
``promtool check metrics``.
"""

from __future__ import annotations

import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from engine import SagaEngine, SagaState, Settings, metrics
from engine.metrics import total
from tests.conftest import empty_tables
from tests.helpers.engines import wait_state
from tests.helpers.procs import Processes, worker
from tests.helpers.remote import remote_travel
from tests.test_metrics import promtool

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

APP = "tests.helpers.proc_app"


@pytest.fixture
def prefix() -> str:
    return f"pm-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    plain = redis.Redis.from_url(redis_url)
    yield plain
    plain.flushdb()  # this test worker's own database
    plain.close()


@pytest.fixture
def procs(pg_url: str, redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Processes]:
    empty_tables(pg_url)
    env = {"SAGA_DATABASE_URL": pg_url, "SAGA_REDIS_URL": redis_url, "SAGA_REDIS_PREFIX": prefix}
    made = Processes(tmp_path, env)
    yield made
    made.close()


@pytest.fixture
def starter(pg_url: str, redis_url: str, prefix: str) -> Iterator[SagaEngine]:
    engine = SagaEngine(
        [remote_travel(timeout=5.0)],
        settings=Settings(
            database_url=pg_url, redis_url=redis_url, redis_prefix=prefix, worker_id="starter"
        ),
    )
    yield engine
    engine.close()


def test_a_participant_counts_and_times_the_commands_it_answers(
    procs: Processes, starter: SagaEngine, client: redis.Redis, prefix: str
) -> None:
    worker(procs, "w1", APP)
    procs.start("p1", "-A", APP, "participant", "--metrics-port", "0", ready="metrics on http://")
    url = _metrics_url(procs.log("p1"))
    client.xadd(f"{prefix}:commands:hotel", {"junk": "not a command"})

    done = starter.start("rtravel", {}).id
    refused = starter.start("rtravel", {"fatal": {"car": True}}).id
    wait_state(starter, done, SagaState.COMPLETED, timeout=30)
    wait_state(starter, refused, SagaState.COMPENSATED, timeout=30)
    text = _scrape(url)
    parsed = metrics.values(text)

    answered = "saga_participant_commands_total"
    assert total(parsed, answered, command="hotel.do", outcome="success") == 2
    assert total(parsed, answered, command="flight.do", outcome="success") == 2
    assert total(parsed, answered, command="car.do", outcome="success") == 1
    assert total(parsed, answered, command="car.do", outcome="fail") == 1
    assert total(parsed, answered, command="flight.undo", outcome="success") == 1
    assert total(parsed, answered, command="hotel.undo", outcome="success") == 1
    # The refused step is undone too: its action may have done something first.
    assert total(parsed, answered, command="car.undo", outcome="success") == 1
    handler = "saga_participant_handler_duration_seconds_count"
    assert total(parsed, handler, command="car.do", outcome="fail") == 1
    assert total(parsed, "saga_participant_command_wait_seconds_count", command="hotel.do") == 2
    hotel = f"{prefix}:commands:hotel"
    assert total(parsed, "saga_poison_records_total", stream=hotel, why="malformed") == 1
    assert total(parsed, "saga_participant_busy") == 0
    checked = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _metrics_url(log: str) -> str:
    line = next(line for line in log.splitlines() if "metrics on http://" in line)
    return line.split("metrics on ", 1)[1].split()[0].replace("0.0.0.0", "127.0.0.1")


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    return text
