"""The test app on neopool's defaults, plus tasks that show churn and a blocked loop.

``celery -A defaults_app worker`` (with ``tests/celery`` on ``PYTHONPATH``):
the pool sizes the test harness passes through the environment are removed at
import, so the worker runs with neopool's own defaults (as a user's would).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

for _name in ("NEOPOOL_POOL_MAX_SIZE", "NEOPOOL_POOL_MIN_SIZE"):
    os.environ.pop(_name, None)
if _size := os.environ.get("NEOPOOL_TEST_POOL_MAX_SIZE"):  # a size the user set
    os.environ["NEOPOOL_POOL_MAX_SIZE"] = _size

from neopool import Neo4jConnectionFactory  # noqa: E402
from neopool.celery import AsyncTask  # noqa: E402
from neopool.testing.celery_worker import app  # noqa: E402

__all__ = ["app"]


def where() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "loop": str(id(asyncio.get_running_loop())),
    }


@app.task(name="neopool.testing.borrow_and_hold", base=AsyncTask)  # type: ignore[untyped-decorator]
async def borrow_and_hold(hold_s: float) -> dict[str, Any]:
    """Borrow, run a query, hold the lease a while, return it."""
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        await driver.execute_query("RETURN 1")
        await asyncio.sleep(hold_s)
        return where()


async def _one_query() -> dict[str, Any]:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        await driver.execute_query("RETURN 1")
        return where()


@app.task(name="neopool.testing.query_in_new_loop")  # type: ignore[untyped-decorator]
def query_in_new_loop() -> dict[str, Any]:
    """The anti-pattern: ``asyncio.run`` per task, a new loop (and driver) each time."""
    return asyncio.run(_one_query())


def lookup_synchronously(seconds: float) -> None:
    """A synchronous call inside a coroutine (a database lookup, say): it blocks the loop."""
    time.sleep(seconds)


@app.task(name="neopool.testing.block_the_loop", base=AsyncTask)  # type: ignore[untyped-decorator]
async def block_the_loop(seconds: float) -> dict[str, Any]:
    """Block the loop it runs on for ``seconds``, then give it back."""
    lookup_synchronously(seconds)
    await asyncio.sleep(0)
    return where()
