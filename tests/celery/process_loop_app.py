"""The test app, plus the tasks the process-loop tests need.

``celery -A process_loop_app worker`` (with ``tests/celery`` on ``PYTHONPATH``)
builds :mod:`neopool.testing.celery_worker`'s app from the environment; the
loop mode comes from ``NEOPOOL_CELERY_LOOP``. With ``NEOPOOL_TEST_PARENT_LOOP``
set, the worker's main process starts its process loop and borrows on it at
import, before any child is forked (the fork test).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import redis

import neopool
from neopool import Neo4jConnectionFactory, runner
from neopool.celery import AsyncTask
from neopool.testing.celery_worker import app

__all__ = ["app"]

PARENT_LOOP_ENV = "NEOPOOL_TEST_PARENT_LOOP"


def where() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "loop": str(id(asyncio.get_running_loop())),
    }


@app.task(name="neopool.testing.borrow_in_line", base=AsyncTask)  # type: ignore[untyped-decorator]
async def borrow_in_line(hold_s: float) -> dict[str, Any]:
    """Borrow (noting when it asked and when it got the lease), hold, return."""
    want = time.monotonic()
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        got = time.monotonic()
        await borrowed.get_driver()
        await asyncio.sleep(hold_s)
    return {**where(), "want": want, "got": got}


@app.task(name="neopool.testing.leave_behind", base=AsyncTask)  # type: ignore[untyped-decorator]
async def leave_behind(key: str) -> dict[str, Any]:
    """Spawn a task that would run for an hour, and return without it."""

    async def background() -> None:
        try:
            async with Neo4jConnectionFactory.borrow_connection() as borrowed:
                await borrowed.get_driver()
                await asyncio.sleep(3600)
        except asyncio.CancelledError:
            redis.Redis.from_url(app.conf.broker_url).rpush(key, "cancelled")
            raise

    asyncio.get_running_loop().create_task(background())
    await asyncio.sleep(0.2)  # it holds its lease now
    return where()


@app.task(name="neopool.testing.own_request", bind=True, base=AsyncTask)  # type: ignore[untyped-decorator]
async def own_request(self: Any, hold_s: float) -> dict[str, Any]:
    """What a bound task sees of its request: at first, after others ran, in a task it spawned."""
    began = time.monotonic()
    first = self.request.id
    await asyncio.sleep(hold_s)  # the other tasks of the loop run meanwhile

    async def spawned() -> Any:
        return self.request.id

    return {
        **where(),
        "began": began,
        "ended": time.monotonic(),
        "first": first,
        "id": self.request.id,
        "spawned": await asyncio.get_running_loop().create_task(spawned()),
        "retries": self.request.retries,
        "hostname": self.request.hostname,
    }


@app.task(name="neopool.testing.retry_once", bind=True, base=AsyncTask)  # type: ignore[untyped-decorator]
async def retry_once(self: Any) -> dict[str, Any]:
    """Ask to be retried on the first run; return what the second one sees."""
    await asyncio.sleep(0.1)
    if self.request.retries == 0:
        raise self.retry(countdown=0, max_retries=1)
    return {**where(), "id": self.request.id, "retries": self.request.retries}


async def _ping() -> None:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        await driver.verify_connectivity()


@app.task(name="neopool.testing.where_sync")  # type: ignore[untyped-decorator]
def where_sync() -> dict[str, Any]:
    """A sync task: neopool.run, and where the coroutine ran."""

    async def body() -> dict[str, Any]:
        await _ping()
        return where()

    return {**neopool.run(body()), "caller_thread": threading.current_thread().name}


try:
    from neopool.demo.lightrag_workload import register_task

    register_task(app)
except ImportError:  # pragma: no cover - without lightrag-hku
    pass


if os.environ.get(PARENT_LOOP_ENV):
    # The worker's main process gets a process loop with a warm pool before forking.
    from neopool.registry import GlobalNeo4jConnectionPool

    runner.use_process_loop()
    neopool.run(_ping())
    (_parent_pool,) = GlobalNeo4jConnectionPool().pools()
    print(f"parent process loop {_parent_pool.loop_id} pid {os.getpid()}", flush=True)
