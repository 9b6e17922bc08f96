"""What user code does with the pool, shared by the test packages.

* :func:`one_query`: a task's body: borrow, one query, return.
* :func:`query_on`: the same on a given loop pool (one the test made itself).
* :func:`borrowers_in_line`: tasks queued one after another on a full pool,
  each noting when it was served.
* :class:`WorkerThread`: a thread with a persistent neopool loop, idle between
  jobs, as a Celery worker thread is.
* :class:`Runner`: :class:`asyncio.Runner` (its backport on Python 3.10).
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from neopool import EventLoopConnectionPool, Neo4jConnectionFactory
from polling import eventually_async

if sys.version_info >= (3, 11):
    from asyncio import Runner
else:  # pragma: no cover - exercised on 3.10 only
    from backports.asyncio.runner import Runner

__all__ = ["Runner", "WorkerThread", "borrowers_in_line", "one_query", "query_on"]


async def one_query() -> int:
    """Borrow from the running loop's pool, run ``RETURN 1``, give the lease back."""
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        records, _, _ = await driver.execute_query("RETURN 1 AS one", database_="neo4j")
        return int(records[0]["one"])


async def query_on(pool: EventLoopConnectionPool) -> None:
    """Borrow from ``pool``, run ``RETURN 1``, give the lease back (also when the query fails)."""
    lease = await pool.borrow()
    try:
        driver = await lease.get_driver()
        await driver.execute_query("RETURN 1", database_="neo4j")
    finally:
        await pool.return_connection(lease)


async def borrowers_in_line(
    pool: EventLoopConnectionPool, count: int
) -> tuple[list[int], list[asyncio.Task[None]]]:
    """``count`` borrowers queued on a full ``pool``, each in line before the next comes.

    Borrower ``n`` (from 0) appends ``n`` to the list returned once it is served
    and gives its lease straight back; the tasks end when all have been served.
    """
    served: list[int] = []

    async def borrower(number: int) -> None:
        lease = await pool.borrow()
        served.append(number)
        await pool.return_connection(lease)

    tasks: list[asyncio.Task[None]] = []
    for number in range(count):
        tasks.append(asyncio.create_task(borrower(number)))
        assert await eventually_async(lambda: pool.waiting == len(tasks))  # in line
    return served, tasks


class WorkerThread:
    """A thread that runs one job at a time, idle between jobs, as a Celery thread is.

    Jobs are plain callables (typically ``lambda: neopool.run(...)``), so the
    thread's persistent loop outlives each job.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None]
        self._jobs = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, result = item
            try:
                result.set_result(job())
            except BaseException as exc:
                result.set_exception(exc)

    def submit(self, job: Callable[[], Any]) -> Future[Any]:
        """Queue ``job`` for the thread; its result (or exception) comes in the future."""
        result: Future[Any] = Future()
        self._jobs.put((job, result))
        return result

    def call(self, job: Callable[[], Any], timeout: float = 30) -> Any:
        """Run ``job`` in the thread and return its result (raising what it raised)."""
        return self.submit(job).result(timeout)

    def end(self, timeout: float = 30) -> None:
        """Let the thread finish its jobs and end (its loop closes as it does); join it."""
        self._jobs.put(None)
        self.thread.join(timeout)
