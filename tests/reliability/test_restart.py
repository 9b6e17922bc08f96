"""A server restart under load: borrowers fail clearly, nothing is lost, the pool heals."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from neo4j import AsyncGraphDatabase
from neo4j.exceptions import DriverError, Neo4jError

from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory, PoolStats
from neopool.embedded import BoltServer
from neopool.testing import reset_registry

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        bool(os.environ.get("NEOPOOL_TEST_NEO4J_URI")),
        reason="restarts the server: needs the embedded Bolt server, not a shared Neo4j",
    ),
]

LOOPS = 4
BORROWERS = 20
#: Longest a single write may take, with the timeouts configured below, before it counts as hung.
HANG_AFTER = 20.0


@pytest.fixture(scope="module")
def server() -> Iterator[BoltServer]:
    """A Bolt server of this module's own, which its tests may stop and start."""
    with BoltServer() as own:
        yield own


@pytest.fixture
def registry(server: BoltServer) -> Iterator[GlobalNeo4jConnectionPool]:
    reset_registry()
    GlobalNeo4jConnectionPool.set_config(
        server.config(
            pool_max_size=10,
            pool_min_size=2,
            connection_timeout=2.0,
            connection_acquisition_timeout=2.0,
            max_transaction_retry_time=1.0,
            borrow_timeout=30.0,
        )
    )
    yield GlobalNeo4jConnectionPool()
    reset_registry()


@dataclass
class Fleet:
    """What the writers saw: shared by every loop's thread, changed under a lock."""

    run_id: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: Iterator[int] = field(default_factory=itertools.count)
    acknowledged: set[int] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)
    hung: int = 0
    stats: list[PoolStats] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    server_back: threading.Event = field(default_factory=threading.Event)
    first_success_after_restart: list[float] = field(default_factory=list)
    restarted_at: float = 0.0

    def __post_init__(self) -> None:
        self.writing = [threading.Event() for _ in range(LOOPS)]
        self.failing = [threading.Event() for _ in range(LOOPS)]
        self.recovered = [threading.Event() for _ in range(LOOPS)]


async def _write_once(fleet: Fleet) -> int:
    with fleet.lock:
        probe = next(fleet.ids)
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        await driver.execute_query(
            "CREATE (:RestartProbe {run: $run, id: $id})",
            run=fleet.run_id,
            id=probe,
            database_="neo4j",
        )
    return probe


async def _borrower(fleet: Fleet, loop_index: int) -> None:
    while not fleet.stop.is_set():
        attempt = asyncio.ensure_future(_write_once(fleet))
        done, _ = await asyncio.wait({attempt}, timeout=HANG_AFTER)
        if not done:
            attempt.cancel()
            with fleet.lock:
                fleet.hung += 1
            continue
        try:
            probe = attempt.result()
        except (Neo4jError, DriverError) as exc:
            with fleet.lock:
                fleet.errors.append(exc)
            fleet.failing[loop_index].set()
            await asyncio.sleep(0.05)  # a real worker would back off too
            continue
        with fleet.lock:
            fleet.acknowledged.add(probe)
            if fleet.server_back.is_set() and not fleet.recovered[loop_index].is_set():
                fleet.first_success_after_restart.append(time.monotonic() - fleet.restarted_at)
                fleet.recovered[loop_index].set()
        fleet.writing[loop_index].set()


async def _loop_main(fleet: Fleet, loop_index: int) -> None:
    await asyncio.gather(*(_borrower(fleet, loop_index) for _ in range(BORROWERS)))
    pool = await GlobalNeo4jConnectionPool().get_pool()
    with fleet.lock:
        fleet.stats.append(pool.stats())


async def _count_probes(server: BoltServer, run_id: str) -> set[int]:
    driver = AsyncGraphDatabase.driver(server.uri, auth=(server.username, server.password))
    try:
        records, _, _ = await driver.execute_query(
            "MATCH (n:RestartProbe) WHERE n.run = $run RETURN n.id AS id",
            run=run_id,
            database_="neo4j",
        )
    finally:
        await driver.close()
    return {int(record["id"]) for record in records}


def _wait_all(events: list[threading.Event], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    return all(event.wait(max(0.0, deadline - time.monotonic())) for event in events)


def test_a_server_restart_under_load_loses_no_lease_and_no_acknowledged_write(
    server: BoltServer, registry: GlobalNeo4jConnectionPool
) -> None:
    fleet = Fleet(run_id=f"restart-{time.time_ns()}")
    threads = [
        threading.Thread(target=asyncio.run, args=(_loop_main(fleet, i),), name=f"loop-{i}")
        for i in range(LOOPS)
    ]
    for thread in threads:
        thread.start()
    try:
        assert _wait_all(fleet.writing, 60), "writers never got going"

        server.stop()
        assert _wait_all(fleet.failing, 60), "no loop noticed the server was gone"

        server.start()
        fleet.restarted_at = time.monotonic()
        fleet.server_back.set()
        assert _wait_all(fleet.recovered, 60), "some loop never wrote again after the restart"
    finally:
        fleet.stop.set()
        for thread in threads:
            thread.join(HANG_AFTER * 2)
    assert not any(thread.is_alive() for thread in threads), "a loop hung"

    assert fleet.hung == 0, f"{fleet.hung} write(s) hung past {HANG_AFTER}s"
    assert fleet.errors, "the outage should have failed some writes"
    assert all(isinstance(exc, (Neo4jError, DriverError)) for exc in fleet.errors)
    assert len(fleet.stats) == LOOPS
    for stats in fleet.stats:  # no lease lost
        assert stats["in_use"] == 0
        assert stats["available"] == stats["total"] <= stats["max_size"]
    stored = asyncio.run(_count_probes(server, fleet.run_id))
    lost = fleet.acknowledged - stored
    assert not lost, f"{len(lost)} acknowledged write(s) are missing after the restart"


async def test_a_new_borrow_after_the_restart_succeeds_on_its_first_attempt(
    server: BoltServer, registry: GlobalNeo4jConnectionPool
) -> None:
    fleet = Fleet(run_id=f"first-{time.time_ns()}")
    await _write_once(fleet)  # the pool and its driver are open and warm

    await asyncio.to_thread(server.stop)
    with pytest.raises((Neo4jError, DriverError)):
        await _write_once(fleet)
    await asyncio.to_thread(server.start)

    await _write_once(fleet)  # no retry loop: the very next borrow works
    stats = (await registry.get_pool()).stats()
    assert stats["in_use"] == 0
    assert stats["total"] <= stats["max_size"]
