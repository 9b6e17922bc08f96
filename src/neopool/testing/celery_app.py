"""A Celery app with LightRAG-style ingestion tasks, for tests, the demo and benchmarks.

``make_app(broker_url, config)`` builds it; a worker subprocess imports
:mod:`neopool.testing.celery_worker`, which builds the same app from the
environment. Every task writes through a real driver:

``ingest``             ``async def`` on :class:`~neopool.celery.AsyncTask`: borrow, prepare
                       the workspace's database, MERGE entities and relations, return.
``ingest_sync``        the same from a sync task, through :func:`neopool.run`.
``ingest_new_driver``  the design note's "before": ``asyncio.run`` and a new driver per task.
``hold``               borrow and keep the lease for a while (time limits, revocation).

Each returns where it ran (``pid``, ``thread``, ``loop``), so tests can count loops.
Entity ids are derived from ``doc_id`` and written with MERGE, so a task that
runs twice (``acks_late`` after a crash) leaves exactly one copy.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from typing import Any

from neo4j import AsyncDriver, AsyncGraphDatabase

from neopool.celery import AsyncTask, setup
from neopool.config import Neo4jConnectionConfig
from neopool.database import preparer, quote_identifier
from neopool.factory import Neo4jConnectionFactory
from neopool.runner import run

#: Environment variables :func:`app_from_env` reads (besides ``NEO4J_*``).
BROKER_ENV = "NEOPOOL_CELERY_BROKER_URL"
QUEUE_ENV = "NEOPOOL_CELERY_QUEUE"
DEFAULT_QUEUE = "neopool"


def entity_ids(doc_id: str, entities: int) -> list[str]:
    """The entities a task for ``doc_id`` writes."""
    return [f"{doc_id}/e{i}" for i in range(entities)]


def relation_pairs(doc_id: str, entities: int) -> list[list[str]]:
    """The relations it writes: a chain through its entities."""
    ids = entity_ids(doc_id, entities)
    return [[a, b] for a, b in itertools.pairwise(ids)]


async def write_document(
    driver: AsyncDriver, database: str | None, workspace: str, doc_id: str, entities: int
) -> int:
    """MERGE the document's entities and relations in one write transaction."""
    label = quote_identifier(workspace)
    nodes = (
        f"UNWIND $ids AS id MERGE (n:{label} {{entity_id: id}}) "
        f"SET n.source_id = $doc, n.entity_type = 'concept'"
    )
    edges = (
        f"UNWIND $pairs AS p "
        f"MATCH (a:{label} {{entity_id: p[0]}}), (b:{label} {{entity_id: p[1]}}) "
        f"MERGE (a)-[r:DIRECTED]->(b) SET r.weight = 1.0, r.source_id = $doc"
    )
    ids = entity_ids(doc_id, entities)
    pairs = relation_pairs(doc_id, entities)

    async def work(tx: Any) -> None:
        await (await tx.run(nodes, ids=ids, doc=doc_id)).consume()
        await (await tx.run(edges, pairs=pairs, doc=doc_id)).consume()

    async with driver.session(database=database) as session:
        await session.execute_write(work)
    return len(ids)


def _where() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "loop": str(id(asyncio.get_running_loop())),
    }


async def ingest_pooled(workspace: str, doc_id: str, entities: int = 3) -> dict[str, Any]:
    """Borrow, prepare, write, return: the note's "after" task body."""
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        database = await borrowed.prepare_database(workspace)
        written = await write_document(driver, database, workspace, doc_id, entities)
    return {**_where(), "database": database, "written": written}


async def ingest_unpooled(
    config: Neo4jConnectionConfig, workspace: str, doc_id: str, entities: int = 3
) -> dict[str, Any]:
    """The note's "before" task body: a new driver, used once, closed."""
    driver = AsyncGraphDatabase.driver(config.uri, auth=config.auth(), **config.driver_options())
    try:
        database = await preparer.prepare(driver, config, workspace)
        written = await write_document(driver, database, workspace, doc_id, entities)
    finally:
        await driver.close()
    return {**_where(), "database": database, "written": written}


def make_app(
    broker_url: str,
    config: Neo4jConnectionConfig | None = None,
    *,
    queue: str = DEFAULT_QUEUE,
    main: str = "neopool_testing",
) -> Any:
    """A Celery app on ``broker_url`` (also its result backend), wired by neopool.

    ``config`` is what workers connect with (``None``: ``NEO4J_*`` of the
    worker's environment). Tasks are acknowledged late and re-queued if their
    worker process dies, so a crash re-runs them instead of losing them.
    """
    from celery import Celery

    app = Celery(main, broker=broker_url, backend=broker_url)
    app.conf.update(
        task_default_queue=queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=3600,
    )
    setup(app, config)
    _register_tasks(app)
    return app


def _register_tasks(app: Any) -> None:
    @app.task(name="neopool.testing.ingest", base=AsyncTask)  # type: ignore[untyped-decorator]
    async def ingest(
        workspace: str, doc_id: str, entities: int = 3, crash_key: str | None = None
    ) -> dict[str, Any]:
        """The pooled ingestion task; with ``crash_key``, its first run stalls (see below)."""
        if crash_key is not None:
            await _stall_first_run(app, crash_key)
        return await ingest_pooled(workspace, doc_id, entities)

    @app.task(name="neopool.testing.ingest_sync")  # type: ignore[untyped-decorator]
    def ingest_sync(workspace: str, doc_id: str, entities: int = 3) -> dict[str, Any]:
        """A sync task using the same persistent loop through neopool.run."""
        return run(ingest_pooled(workspace, doc_id, entities))

    @app.task(name="neopool.testing.ingest_new_driver")  # type: ignore[untyped-decorator]
    def ingest_new_driver(workspace: str, doc_id: str, entities: int = 3) -> dict[str, Any]:
        """The note's "before": asyncio.run, and a driver opened and closed per task."""
        from neopool.registry import GlobalNeo4jConnectionPool

        config = GlobalNeo4jConnectionPool.get_config()
        return asyncio.run(ingest_unpooled(config, workspace, doc_id, entities))

    @app.task(name="neopool.testing.hold", base=AsyncTask)  # type: ignore[untyped-decorator]
    async def hold(seconds: float, started_key: str | None = None) -> dict[str, Any]:
        """Keep a lease for ``seconds``; push the pid to ``started_key`` once holding it."""
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            await borrowed.get_driver()
            if started_key is not None:
                _redis(app).rpush(started_key, os.getpid())
            await asyncio.sleep(seconds)
        return _where()

    @app.task(name="neopool.testing.clean_up_on_soft_limit", base=AsyncTask)  # type: ignore[untyped-decorator]
    async def clean_up_on_soft_limit(started_key: str, cleanup_s: float) -> dict[str, Any]:
        """Busy in its own code until the soft time limit, then clean up (Celery's
        pattern: catch ``SoftTimeLimitExceeded``) for ``cleanup_s`` and return."""
        from celery.exceptions import SoftTimeLimitExceeded

        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            await borrowed.get_driver()
            _redis(app).rpush(started_key, os.getpid())
            try:
                end = time.monotonic() + 30
                while time.monotonic() < end:  # the signal raises here, in the coroutine
                    pass
            except SoftTimeLimitExceeded:
                await asyncio.sleep(cleanup_s)
                return {"cleaned_up": True, **_where()}
        return {"cleaned_up": False, **_where()}

    @app.task(name="neopool.testing.hold_busy", base=AsyncTask)  # type: ignore[untyped-decorator]
    async def hold_busy(seconds: float, started_key: str) -> dict[str, Any]:
        """Keep a lease while the loop is busy in callbacks for ``seconds``."""
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            await borrowed.get_driver()
            _redis(app).rpush(started_key, os.getpid())
            await _busy_in_callbacks(seconds)
        return _where()


async def _busy_in_callbacks(seconds: float) -> None:
    """Keep the loop busy for ``seconds`` in plain callbacks, 20 ms each, as a driver
    decoding a large result is: a signal then lands in a callback, not in a task."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    end = time.monotonic() + seconds

    def decode_a_chunk() -> None:
        until = time.monotonic() + 0.02
        while time.monotonic() < until:
            pass
        if time.monotonic() < end:
            loop.call_soon(decode_a_chunk)
        elif not finished.done():
            finished.set_result(None)

    loop.call_soon(decode_a_chunk)
    await finished


async def _stall_first_run(app: Any, crash_key: str) -> None:
    """On the first run only, announce the pid on ``<crash_key>:pid`` and stall.

    A test kills the process while it stalls; the re-run (``acks_late``) finds
    the key already set and goes on normally.
    """
    client = _redis(app)
    if client.set(crash_key, os.getpid(), nx=True):
        client.rpush(f"{crash_key}:pid", os.getpid())
        await asyncio.sleep(3600)


def _redis(app: Any) -> Any:
    import redis

    return redis.Redis.from_url(app.conf.broker_url)
