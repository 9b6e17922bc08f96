"""Process-wide counters: what the live per-loop stats cannot show (loops and drivers gone)."""

from __future__ import annotations

import asyncio
import os
import threading

from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory
from neopool.stats import ProcessTotals


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
