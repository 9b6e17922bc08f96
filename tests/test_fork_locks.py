"""A lock held by another thread at the moment of ``fork`` never deadlocks the child.

Only the forking thread lives on in the child, so a lock another parent thread
held then stays held there for good. Every lock that the fork hook, ending the
inherited pools and a first borrow in the child take must therefore be made
anew in the child. Each test holds one such lock in a parent thread across
``os.fork()``; the child must finish its hook, take that lock, borrow, query
and close its own pool, and exit 0 within a bound.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from forking import query_value, warm_parent_loop
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionConfig
from neopool.database import preparer
from neopool.testing import TcpProxy

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

#: Seconds the child has to finish; a deadlocked one never does.
CHILD_BOUND_S = 30.0

LockOf = Callable[[], Any]
#: What the parent and the child prepare.
WORKSPACE = "fork_lock_test"


def _churn_lock() -> Any:
    return GlobalNeo4jConnectionPool()._churn._lock


def _instance_lock() -> Any:
    return GlobalNeo4jConnectionPool._instance_lock


def _process_totals_lock() -> Any:
    from neopool.stats import PROCESS

    return PROCESS._lock


def _preparer_lock() -> Any:
    return preparer._lock


def _lightrag_fulltext_lock() -> Any:
    from neopool.integrations import lightrag

    return lightrag._fulltext._lock


def _lightrag_dropped_lock() -> Any:
    from neopool.integrations import lightrag

    return lightrag._dropped.lock


def _metrics_registered_lock() -> Any:
    from neopool import metrics

    return metrics._registered_lock


_needs_lightrag = pytest.mark.skipif(
    importlib.util.find_spec("lightrag") is None, reason="needs lightrag-hku"
)
_needs_prometheus = pytest.mark.skipif(
    importlib.util.find_spec("prometheus_client") is None, reason="needs prometheus_client"
)

LOCKS = [
    pytest.param(_churn_lock, id="loop-churn-monitor"),
    pytest.param(_instance_lock, id="registry-instance"),
    pytest.param(_process_totals_lock, id="process-totals"),
    pytest.param(_preparer_lock, id="database-preparer"),
    pytest.param(_lightrag_fulltext_lock, id="lightrag-fulltext", marks=_needs_lightrag),
    pytest.param(_lightrag_dropped_lock, id="lightrag-dropped", marks=_needs_lightrag),
    pytest.param(_metrics_registered_lock, id="metrics-registered", marks=_needs_prometheus),
]


@pytest.fixture
def parent_loop(
    configure: Callable[..., Neo4jConnectionConfig], neopool_proxy: TcpProxy
) -> Iterator[asyncio.AbstractEventLoop]:
    """A parent holding a warm pool on a loop that stays open: the child inherits it."""
    configure(uri=neopool_proxy.uri(), database="neo4j", pool_min_size=1)
    with warm_parent_loop(WORKSPACE) as loop:
        yield loop


_query = functools.partial(query_value, workspace=WORKSPACE)


def _in_child(lock_of: LockOf) -> int:
    """The child's work; its exit status: 0 all done, 3 the lock is still held, 4 wrong answer."""
    if not lock_of().acquire(timeout=5):
        return 3
    lock_of().release()
    # A new loop each time: its pool ends with asyncio.run, which tells the churn monitor.
    return 0 if asyncio.run(_query(42)) == 42 and asyncio.run(_query(43)) == 43 else 4


def _fork_holding(
    lock: Any, child: Callable[[], int], let_go_after: float | None = None
) -> int | None:
    """Fork while another thread holds ``lock``; the child's exit code, ``None`` if it hung.

    With ``let_go_after``, the thread lets go after that many seconds by itself
    (for a lock the fork itself waits for).
    """
    held, done = threading.Event(), threading.Event()
    if let_go_after is not None:
        threading.Timer(let_go_after, done.set).start()

    def hold() -> None:
        with lock:
            held.set()
            done.wait(CHILD_BOUND_S + 10)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # the child
            status = 1
            try:
                status = child()
            finally:
                os._exit(status)
    finally:
        done.set()  # the parent's thread lets go; the child's copy of the lock stays held
    holder.join(10)
    deadline = time.monotonic() + CHILD_BOUND_S
    while time.monotonic() < deadline:
        ended, status = os.waitpid(pid, os.WNOHANG)
        if ended:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


@pytest.mark.parametrize("lock_of", LOCKS)
def test_a_lock_held_by_a_parent_thread_at_fork_does_not_deadlock_the_child(
    parent_loop: asyncio.AbstractEventLoop, lock_of: LockOf
) -> None:
    status = _fork_holding(lock_of(), lambda: _in_child(lock_of))
    assert status is not None, "the child hung: it took a lock it inherited held"
    assert status != 3, "the child's lock is still the parent's, held for good"
    assert status == 0, f"the child failed (exit status {status})"
    # The parent goes on as before, on its own pool.
    assert parent_loop.run_until_complete(_query(7)) == 7


def test_fork_waits_for_the_registry_lock_and_the_child_gets_it_free(
    parent_loop: asyncio.AbstractEventLoop,
) -> None:
    """The registry's own lock is taken by the fork (before it) and let go on both sides."""
    registry = GlobalNeo4jConnectionPool()
    status = _fork_holding(registry._lock, lambda: _in_child(lambda: registry._lock), 0.3)
    assert status == 0, f"the child failed or hung (exit status {status})"
    assert registry._lock.acquire(timeout=5)  # and the parent's is free again
    registry._lock.release()
