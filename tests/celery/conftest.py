"""Real Celery workers (subprocesses) on a real Valkey broker and a real Bolt server.

Every test here is marked ``celery`` by ``tests/conftest.py`` (its directory); those
that start workers are marked ``subprocess`` and ``server`` too (their fixtures).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("celery", reason="the Celery tests need the 'celery' extra")
pytest.importorskip("redis", reason="the Celery tests need the 'celery' extra (celery[redis])")


from celery import Celery
from neopool.config import Neo4jConnectionConfig
from neopool.testing.celery_app import make_app
from neopool.testing.worker_process import CeleryWorkerProcess
from runner_modes import MODES, runner_in_mode

_queues = itertools.count(1)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """The runner in each of its modes, for tasks called in this process (``apply``)."""
    with runner_in_mode(request.param) as mode:
        yield mode


@pytest.fixture
def app() -> Celery:
    """An app for tasks defined and called in the test itself (no broker, no worker)."""
    return Celery("in-process", set_as_current=False)


@pytest.fixture
def queue() -> str:
    """A queue (and worker name) of this test only."""
    return f"neopool-test-{next(_queues)}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def celery_app(neopool_broker_url: str, worker_config: Neo4jConnectionConfig, queue: str) -> Any:
    """The client side of the test app, on this test's queue."""
    return make_app(neopool_broker_url, worker_config, queue=queue, main=queue)


@pytest.fixture
def start_worker(
    celery_app: Any, worker_config: Neo4jConnectionConfig, queue: str
) -> Iterator[Callable[..., CeleryWorkerProcess]]:
    """Start a worker subprocess on this test's queue; each is stopped after the test."""
    started: list[CeleryWorkerProcess] = []

    def start(pool: str, concurrency: int, **options: Any) -> CeleryWorkerProcess:
        worker = CeleryWorkerProcess(
            celery_app, worker_config, pool=pool, concurrency=concurrency, queue=queue, **options
        )
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        try:
            worker.stop()
        finally:
            worker.kill()


@pytest.fixture
def workspace() -> str:
    """A workspace (node label) of this test only."""
    return f"celery-{uuid.uuid4().hex[:8]}"
