"""Process-wide counters: what the live per-loop stats cannot show (loops and drivers gone)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading

import pytest

from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionConfig, Neo4jConnectionFactory
from neopool.stats import PROCESS, ProcessTotals
from neopool.testing import FakeDriverFactory, reset_registry
from polling import eventually


def _delta(after: ProcessTotals, before: ProcessTotals) -> dict[str, int]:
    return {key: int(after[key]) - int(before[key]) for key in after if key != "pid"}  # type: ignore[literal-required]


async def _one_query() -> None:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        await driver.execute_query("RETURN 1")


def test_a_new_loop_per_call_shows_in_the_totals(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> None:
    """``asyncio.run`` per call: 20 loops and 20 drivers counted, none of them live any more."""
    before = Neo4jConnectionFactory.process_totals()
    live: list[int] = []

    def calls() -> None:
        for _ in range(20):
            asyncio.run(_one_query())
        live.append(len(neopool_registry.pools()))

    thread = threading.Thread(target=calls)
    thread.start()
    thread.join()

    after = neopool_registry.process_totals()
    assert after["pid"] == os.getpid()
    assert _delta(after, before) == {
        "loops_served": 20,
        "pools_closed": 20,
        "drivers_created": 20,
        "drivers_closed": 20,
        "borrows": 20,
        "loop_blocks": 0,
    }
    assert live == [0]  # the per-loop stats show none of them


async def test_one_loop_serves_many_borrows(neopool_registry: GlobalNeo4jConnectionPool) -> None:
    before = neopool_registry.process_totals()
    for _ in range(5):
        await _one_query()
    stats = await Neo4jConnectionFactory.get_pool_stats()
    delta = _delta(neopool_registry.process_totals(), before)
    assert delta["borrows"] == 5
    assert delta["loops_served"] == delta["drivers_created"] == 1
    assert delta["drivers_closed"] == 0
    assert all(isinstance(entry, dict) and "in_use" in entry for entry in stats.values())


def test_a_forked_child_starts_from_zero(neopool_registry: GlobalNeo4jConnectionPool) -> None:
    """The parent's pools (inherited, then terminated in the child) are not the child's."""
    asyncio.run(_one_query())  # a pool ended in the parent
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_one_query())  # and one still open when it forks
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                totals = neopool_registry.process_totals()
                counts = [v for k, v in totals.items() if k != "pid"]
                ok = totals["pid"] == os.getpid() and not any(counts)
                os.write(write, b"1" if ok else repr(totals).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as answer:
            reply = answer.read()
        os.waitpid(pid, 0)
        assert reply == b"1"
        assert neopool_registry.process_totals()["loops_served"] >= 2
    finally:
        loop.run_until_complete(neopool_registry.close_all_pools())
        loop.close()


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_fork_while_another_thread_counts_does_not_hang_the_child() -> None:
    """The totals' lock, held by a parent thread at the fork, is not the one the child's
    ending of its inherited pools counts under (server-free: fake drivers)."""
    reset_registry()
    GlobalNeo4jConnectionPool.set_config(
        Neo4jConnectionConfig(uri="bolt://127.0.0.1:7687", password="x")
    )
    GlobalNeo4jConnectionPool.set_driver_factory(FakeDriverFactory())
    loop = asyncio.new_event_loop()
    held, done = threading.Event(), threading.Event()

    def count_slowly() -> None:
        with PROCESS._lock:  # as a parent thread's count does, at the wrong moment
            held.set()
            done.wait(30)

    try:
        loop.run_until_complete(_borrow_once())  # a pool the child inherits
        holder = threading.Thread(target=count_slowly, daemon=True)
        holder.start()
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os._exit(0 if PROCESS.totals()["pools_closed"] == 0 else 4)
        done.set()
        holder.join(10)
        ended: list[tuple[int, int]] = []

        def child_ended() -> bool:
            ended.append(os.waitpid(pid, os.WNOHANG))
            return ended[-1][0] != 0

        assert eventually(child_ended, 20), (
            "the child hung: it counted under a lock a parent thread held at the fork"
        )
        assert os.waitstatus_to_exitcode(ended[-1][1]) == 0
    finally:
        done.set()
        with contextlib.suppress(ChildProcessError, NameError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        loop.run_until_complete(GlobalNeo4jConnectionPool().close_all_pools())
        loop.close()
        GlobalNeo4jConnectionPool.set_driver_factory()
        reset_registry()


async def _borrow_once() -> None:
    async with Neo4jConnectionFactory.borrow_connection():
        pass
