"""The task every mode runs: a LightRAG-style ingestion, timed and counted.

Borrow (or open a driver), prepare the workspace's database (cached once per
process, the same for every mode), MERGE a few entities and the relations
between them in one write transaction, give the connection back. The write
itself is :func:`neopool.testing.celery_app.write_document`, shared with the
Celery tests, so the demo measures the code the tests check.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from neo4j import AsyncDriver

from neopool.database import preparer
from neopool.demo import instrument
from neopool.factory import Neo4jConnectionFactory
from neopool.registry import GlobalNeo4jConnectionPool
from neopool.testing.celery_app import write_document

T = TypeVar("T")
ENTITIES = 3


async def ingest_borrowed(workspace: str, doc_id: str) -> None:
    """neopool: borrow from the running loop's pool, prepare, write, return."""
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        database = await borrowed.prepare_database(workspace)
        await write_document(driver, database, workspace, doc_id, ENTITIES)


async def ingest_on(driver: AsyncDriver, workspace: str, doc_id: str) -> None:
    """The same work on a driver the caller manages."""
    config = GlobalNeo4jConnectionPool.get_config()
    database = await preparer.prepare(driver, config, workspace)
    await write_document(driver, database, workspace, doc_id, ENTITIES)


async def ingest_new_driver(workspace: str, doc_id: str) -> None:
    """The design note's "before": a driver opened for this task and closed after it."""
    driver = instrument.new_driver(GlobalNeo4jConnectionPool.get_config())
    try:
        await ingest_on(driver, workspace, doc_id)
    finally:
        await driver.close()


class IdealLoop:
    """The hand-written ideal: one loop and one driver per process, kept for its life.

    What an expert would write for one process with no library at all; the
    persistent runner should come close to it.
    """

    _state: tuple[int, asyncio.AbstractEventLoop, AsyncDriver] | None = None
    _lock = threading.Lock()

    @classmethod
    def run(cls, workspace: str, doc_id: str) -> None:
        with cls._lock:
            state = cls._state
            if state is None or state[0] != os.getpid():
                loop = asyncio.new_event_loop()
                driver = instrument.new_driver(GlobalNeo4jConnectionPool.get_config())
                state = cls._state = (os.getpid(), loop, driver)
            _pid, loop, driver = state
            loop.run_until_complete(ingest_on(driver, workspace, doc_id))

    @classmethod
    def close(cls) -> None:
        with cls._lock:
            state, cls._state = cls._state, None
            if state is not None and state[0] == os.getpid():
                _pid, loop, driver = state
                loop.run_until_complete(driver.close())
                loop.close()


def timed(body: Callable[[], T]) -> dict[str, Any]:
    """Run ``body`` and report its duration and this process's counters before and after."""
    before = instrument.counts()
    started = time.perf_counter()
    body()
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    return {"pid": os.getpid(), "ms": elapsed_ms, "before": before, "after": instrument.counts()}


async def timed_async(body: Awaitable[object]) -> dict[str, Any]:
    """:func:`timed` for a coroutine running on the caller's loop."""
    before = instrument.counts()
    started = time.perf_counter()
    await body
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    return {"pid": os.getpid(), "ms": elapsed_ms, "before": before, "after": instrument.counts()}
