"""A forked child must not disturb the loops its parent keeps in other threads.

A selector loop's epoll instance is shared with a forked child. If the child
closed its copy of a parent's loop, it would unregister the parent's wake-up
pipe from that shared instance, and the parent's loop would no longer hear
``call_soon_threadsafe`` (nor anything that relies on it, such as
``run_coroutine_threadsafe`` or a thread finishing a future).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import neopool
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory

# Forking a process that has threads is the point: Celery prefork does it (3.12+ warns).
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


async def one_query() -> int:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        records, _, _ = await driver.execute_query("RETURN 1 AS one", database_="neo4j")
        return int(records[0]["one"])


async def wait_for_another_thread(done_elsewhere: concurrent.futures.Future[int]) -> int:
    """Only the loop's wake-up pipe can end this wait before its 5 s guard."""
    return await asyncio.wait_for(asyncio.wrap_future(done_elsewhere), 5)


def wake_up_pipe_is_watched(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the kernel's epoll set of ``loop`` still holds its self-pipe (Linux)."""
    epoll_fd = loop._selector.fileno()  # type: ignore[attr-defined]
    pipe_fd = loop._ssock.fileno()  # type: ignore[attr-defined]
    with open(f"/proc/self/fdinfo/{epoll_fd}") as info:
        watched = {int(line.split()[1]) for line in info if line.startswith("tfd:")}
    return pipe_fd in watched


@pytest.fixture
def parent_worker(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> Iterator[Callable[[Callable[[], Any]], Any]]:
    """A thread with a persistent neopool loop, idle between jobs, as a Celery thread is."""
    jobs: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None]
    jobs = queue.Queue()

    def serve() -> None:
        while (job := jobs.get()) is not None:
            work, result = job
            try:
                result.set_result(work())
            except BaseException as exc:
                result.set_exception(exc)
        neopool.runner.close_thread_loop()

    thread = threading.Thread(target=serve, daemon=True, name="neopool-parent-worker")
    thread.start()

    def submit(work: Callable[[], Any]) -> Any:
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()
        jobs.put((work, result))
        return result

    assert submit(lambda: neopool.run(one_query())).result(30) == 1
    yield submit
    jobs.put(None)
    thread.join(30)


def fork_a_child_that_works_and_exits() -> None:
    pid = os.fork()
    if pid == 0:  # the child: forget everything inherited, work, exit
        code = 1
        try:
            gc.collect()
            code = 0 if asyncio.run(one_query()) == 1 else 2
            gc.collect()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.timeout(120)
def test_the_parents_idle_loop_with_a_pool_still_wakes_after_a_child_exits(
    parent_worker: Callable[[Callable[[], Any]], Any],
) -> None:
    fork_a_child_that_works_and_exits()

    loop = neopool.runner.loops()["neopool-parent-worker"]
    assert wake_up_pipe_is_watched(loop), "the child unregistered the parent's wake-up pipe"
    elsewhere: concurrent.futures.Future[int] = concurrent.futures.Future()
    job = parent_worker(lambda: neopool.run(wait_for_another_thread(elsewhere)))
    threading.Timer(0.2, elsewhere.set_result, args=(7,)).start()
    assert job.result(15) == 7  # a deaf loop fails here with TimeoutError
    assert parent_worker(lambda: neopool.run(one_query())).result(15) == 1


@pytest.mark.timeout(120)
def test_a_persistent_loop_without_a_pool_is_not_closed_by_a_child_either(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> None:
    ready, finish = threading.Event(), threading.Event()

    async def nothing() -> None:
        return None

    def idle_thread() -> None:
        neopool.run(nothing())
        ready.set()
        finish.wait(60)
        neopool.runner.close_thread_loop()

    thread = threading.Thread(target=idle_thread, name="neopool-idle-loop")
    thread.start()
    ready.wait(30)
    try:
        fork_a_child_that_works_and_exits()
        loop = neopool.runner.loops()["neopool-idle-loop"]
        assert wake_up_pipe_is_watched(loop), "the child unregistered the parent's wake-up pipe"
    finally:
        finish.set()
        thread.join(30)
