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
import selectors
import sys
import threading
from collections.abc import Iterator

import pytest

import neopool
from neopool import GlobalNeo4jConnectionPool
from polling import eventually
from user_code import WorkerThread, one_query

# Forking a process that has threads is the point: Celery prefork does it (3.12+ warns).
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


async def wait_for_another_thread(
    done_elsewhere: concurrent.futures.Future[int], waiting: threading.Event
) -> int:
    """Only the loop's wake-up pipe can end this wait.

    No timeout of its own: a guard's timer would wake a deaf loop too, which
    then finds the result waiting and returns it as if nothing were wrong.
    """
    asyncio.get_running_loop().call_soon(waiting.set)  # runs once the wait below has begun
    return await asyncio.wrap_future(done_elsewhere)


def wake_up_pipe_is_watched(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the kernel's epoll set of ``loop`` still holds its self-pipe (Linux)."""
    epoll_fd = loop._selector.fileno()  # type: ignore[attr-defined]
    pipe_fd = loop._ssock.fileno()  # type: ignore[attr-defined]
    with open(f"/proc/self/fdinfo/{epoll_fd}") as info:
        watched = {int(line.split()[1]) for line in info if line.startswith("tfd:")}
    return pipe_fd in watched


def asleep_in_its_selector(thread: threading.Thread) -> bool:
    """Whether ``thread``'s loop is blocked in its selector, until something wakes it."""
    frame = sys._current_frames().get(thread.ident or 0)
    code = frame.f_code if frame is not None else None
    return code is not None and code.co_name == "select" and code.co_filename == selectors.__file__


@pytest.fixture
def parent_worker(neopool_registry: GlobalNeo4jConnectionPool) -> Iterator[WorkerThread]:
    """A thread with a persistent neopool loop and a pool, idle between jobs (a Celery thread)."""
    worker = WorkerThread("neopool-parent-worker")
    assert worker.call(lambda: neopool.run(one_query())) == 1
    yield worker
    worker.call(neopool.runner.close_thread_loop)
    worker.end()


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
    parent_worker: WorkerThread,
) -> None:
    fork_a_child_that_works_and_exits()

    loop = neopool.runner.loops()["neopool-parent-worker"]
    assert wake_up_pipe_is_watched(loop), "the child unregistered the parent's wake-up pipe"
    elsewhere: concurrent.futures.Future[int] = concurrent.futures.Future()
    waiting = threading.Event()
    job = parent_worker.submit(lambda: neopool.run(wait_for_another_thread(elsewhere, waiting)))
    assert waiting.wait(15)
    # Finished from this thread while the loop sleeps: only its wake-up pipe can tell it.
    assert eventually(lambda: asleep_in_its_selector(parent_worker.thread))
    elsewhere.set_result(7)
    assert job.result(15) == 7  # a deaf loop never wakes: TimeoutError here
    assert parent_worker.call(lambda: neopool.run(one_query()), timeout=15) == 1


@pytest.mark.timeout(120)
def test_a_persistent_loop_without_a_pool_is_not_closed_by_a_child_either(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> None:
    async def nothing() -> None:
        return None

    worker = WorkerThread("neopool-idle-loop")
    try:
        worker.call(lambda: neopool.run(nothing()))
        fork_a_child_that_works_and_exits()
        loop = neopool.runner.loops()["neopool-idle-loop"]
        assert wake_up_pipe_is_watched(loop), "the child unregistered the parent's wake-up pipe"
    finally:
        worker.call(neopool.runner.close_thread_loop)
        worker.end()
