"""Fork safety (Celery prefork): the child starts empty and never touches the parent's sockets."""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from forking import query_value, warm_parent_loop
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionConfig
from neopool._release import driver_is_closed, driver_socket_count
from neopool.testing import TcpProxy

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    # Forking a process that has threads is the point: Celery prefork does it (3.12+ warns).
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

#: What the parent and the child prepare.
WORKSPACE = "fork_test"


@pytest.fixture
def parent_loop(
    configure: Callable[..., Neo4jConnectionConfig], neopool_proxy: TcpProxy
) -> Iterator[asyncio.AbstractEventLoop]:
    """A parent that already holds a warm pool on a loop that stays open, like a Celery master."""
    configure(uri=neopool_proxy.uri(), database="neo4j", pool_min_size=2, pool_max_size=4)
    with warm_parent_loop(WORKSPACE) as loop:
        yield loop


_query = functools.partial(query_value, workspace=WORKSPACE)


def _child_work() -> dict[str, Any]:
    """What a forked worker does first: look at the registry, then borrow on a new loop."""
    report: dict[str, Any] = {"pools_at_start": len(GlobalNeo4jConnectionPool().pools())}
    drivers = []

    async def query_and_keep_the_driver() -> int:
        value = await _query(42)
        drivers.append((await GlobalNeo4jConnectionPool().get_pool()).driver)
        return value

    report["value"] = asyncio.run(query_and_keep_the_driver())
    gc.collect()  # any finalizer of an inherited driver or socket runs now, inside the child
    report["pools_at_end"] = len(GlobalNeo4jConnectionPool().pools())
    (driver,) = drivers
    report["own_driver_closed"] = driver_is_closed(driver)
    report["own_driver_sockets"] = driver_socket_count(driver)
    return report


def _child_via_os_fork(write_fd: int) -> None:
    status = 1
    try:
        with os.fdopen(write_fd, "w") as pipe:
            json.dump(_child_work(), pipe)
        status = 0
    finally:
        os._exit(status)


def _child_via_multiprocessing(queue: Any) -> None:
    queue.put(_child_work())


def _fork_with_os_fork() -> dict[str, Any]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child_via_os_fork(write_fd)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
    report: dict[str, Any] = json.loads(payload)
    return report


def _fork_with_multiprocessing() -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_child_via_multiprocessing, args=(queue,))
    process.start()
    report: dict[str, Any] = queue.get(timeout=60)
    process.join(60)
    assert process.exitcode == 0, "the child failed"
    return report


@pytest.mark.parametrize(
    "fork", [_fork_with_os_fork, _fork_with_multiprocessing], ids=["os.fork", "multiprocessing"]
)
def test_a_forked_child_starts_empty_and_never_writes_on_an_inherited_socket(
    parent_loop: asyncio.AbstractEventLoop, neopool_proxy: TcpProxy, fork: Any
) -> None:
    inherited = {s["id"]: s["bytes_up"] for s in neopool_proxy.connection_stats() if s["open"]}
    assert inherited, "the parent should hold open connections when it forks"

    report = fork()

    assert report["pools_at_start"] == 0  # the registry is empty in the child
    assert report["value"] == 42  # and borrowing works there, on sockets of its own
    assert report["pools_at_end"] == 0  # asyncio.run closed the child's pool:
    assert report["own_driver_closed"]  # its driver, by driver.close()
    assert report["own_driver_sockets"] == 0
    after = {s["id"]: s for s in neopool_proxy.connection_stats()}
    for conn_id, bytes_up in inherited.items():
        assert after[conn_id]["bytes_up"] == bytes_up, "the child wrote on a parent's socket"
        assert after[conn_id]["open"] == 1, "the child closed a parent's connection"
    assert set(after) - set(inherited), "the child should have opened connections of its own"

    # The parent's pool keeps working after the fork, on the very same connections.
    opened = neopool_proxy.connections_opened
    assert parent_loop.run_until_complete(_query(7)) == 7
    assert neopool_proxy.connections_opened == opened


def test_fork_while_another_thread_runs_a_pool_does_not_deadlock_the_child(
    configure: Callable[..., Neo4jConnectionConfig], neopool_proxy: TcpProxy
) -> None:
    configure(uri=neopool_proxy.uri())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        assert asyncio.run_coroutine_threadsafe(_query(1), loop).result(30) == 1
        report = _fork_with_os_fork()
        assert report["pools_at_start"] == 0
        assert report["value"] == 42
        assert asyncio.run_coroutine_threadsafe(_query(2), loop).result(30) == 2
    finally:
        close = GlobalNeo4jConnectionPool().close_all_pools()
        asyncio.run_coroutine_threadsafe(close, loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
