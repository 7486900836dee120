"""Shared fixtures: a migrated store on SQLite and on PostgreSQL.

``store_url`` runs a test once per backend. PostgreSQL gets one database per
xdist worker, migrated once per session and emptied before each test. Under
CI (``CI`` set) a missing PostgreSQL or Redis fails the run instead of
skipping: a green CI must mean the store suite ran on both backends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from engine.store.migrate import upgrade
from engine.store.schema import metadata
from tests.helpers.engines import Engines
from tests.helpers.participant import Participant

PG_ADMIN_URL = os.environ.get(
    "SAGA_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("SAGA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
IN_CI = bool(os.environ.get("CI"))


def _missing(service: str, why: object) -> None:
    message = f"{service} is not reachable ({why})"
    if IN_CI:
        pytest.fail(f"{message}; CI needs it, so this is a failure, not a skip", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_url(worker_id: str) -> Iterator[str]:
    """A migrated PostgreSQL database of this test worker's own."""
    # SAGA_TEST_DB_SUFFIX keeps two test runs on one server out of each other's databases.
    name = f"saga_test_{worker_id}{os.environ.get('SAGA_TEST_DB_SUFFIX', '')}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        _missing("PostgreSQL", exc.orig)
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty, migrated store: once on SQLite, once on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'saga.db'}"
        upgrade(url)
        return url
    url = request.getfixturevalue("pg_url")
    empty_tables(url)
    return url


def empty_tables(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        names = ", ".join(t.name for t in metadata.sorted_tables)
        conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        for extra in _participant_tables(conn):
            conn.execute(sa.text(f'TRUNCATE "{extra}"'))
    engine.dispose()


def _participant_tables(conn: sa.Connection) -> list[str]:
    # Tables that examples and tests create for their participants.
    own = {t.name for t in metadata.sorted_tables} | {"alembic_version"}
    return [n for n in sa.inspect(conn).get_table_names() if n not in own]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'saga.db'}"
    upgrade(url)
    return url


@pytest.fixture
def redis_url(worker_id: str) -> str:
    """A Redis database of this test worker's own: tests that flush it touch nobody else."""
    index = int(worker_id[2:]) if worker_id.startswith("gw") else 0
    # SAGA_TEST_REDIS_URL's database number is the first xdist worker's; the next count down.
    base, _, first = REDIS_URL.rpartition("/")
    url = f"{base}/{int(first or 15) - index}"
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        _missing("Redis", exc)
    client.close()
    return url


@pytest.fixture
def prefix() -> str:
    """A Redis key prefix of this test's own, so tests never read each other's streams."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(redis_url: str, prefix: str) -> Iterator[redis.Redis]:
    """A plain Redis client for looking behind the engine; deletes the test's keys after."""
    plain = redis.Redis.from_url(redis_url)
    yield plain
    keys = list(plain.scan_iter(f"{prefix}:*"))
    if keys:
        plain.delete(*keys)
    plain.close()


@pytest.fixture(scope="session")
def worker_id(request: pytest.FixtureRequest) -> str:
    # pytest-xdist provides this fixture; without xdist we are the only worker.
    return getattr(request.config, "workerinput", {}).get("workerid", "main")


Factory = Callable[..., object]


@pytest.fixture
def participant(store_url: str) -> Iterator[Participant]:
    """A test participant recording calls and effects in the store's database."""
    p = Participant(store_url)
    yield p
    p.close()


@pytest.fixture
def engines(store_url: str) -> Iterator[Engines]:
    """Build engines (and start workers) on ``store_url``; all stopped after the test."""
    made = Engines(store_url)
    yield made
    made.close()
