"""A server restart under load: borrowers fail clearly, nothing is lost, the pool heals."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import pytest
from neo4j.exceptions import DriverError, Neo4jError

from neopool import GlobalNeo4jConnectionPool
from neopool.embedded import BoltServer
from neopool.testing import BoltTarget, WriteLoad, reset_registry, tls_requested, tls_target
from neopool.testing.write_load import DRILL_SETTINGS

pytestmark = [
    pytest.mark.server,  # a Bolt server of its own, which it restarts
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


@pytest.fixture(scope="module")
def target(server: BoltServer, request: pytest.FixtureRequest) -> Iterator[BoltTarget]:
    """How the pool reaches that server: directly, or through a TLS proxy in a TLS run."""
    direct = BoltTarget(server.uri, server.username, server.password, embedded=server)
    if not tls_requested():
        yield direct
        return
    with tls_target(direct, request.getfixturevalue("neopool_tls_certificates")) as over_tls:
        yield over_tls


@pytest.fixture
def registry(target: BoltTarget) -> Iterator[GlobalNeo4jConnectionPool]:
    reset_registry()
    GlobalNeo4jConnectionPool.set_config(target.config(**DRILL_SETTINGS))
    yield GlobalNeo4jConnectionPool()
    reset_registry()


def test_a_server_restart_under_load_loses_no_lease_and_no_acknowledged_write(
    server: BoltServer, registry: GlobalNeo4jConnectionPool
) -> None:
    load = WriteLoad(LOOPS, BORROWERS, run_id=f"restart-{time.time_ns()}", hang_after=HANG_AFTER)
    load.start()
    try:
        assert load.wait(load.writing, 60), "writers never got going"

        server.stop()
        assert load.wait(load.failing, 60), "no loop noticed the server was gone"

        server.start()
        load.server_back()
        assert load.wait(load.recovered, 60), "some loop never wrote again after the restart"
    finally:
        assert load.finish(), "a loop hung"

    assert load.hung == 0, f"{load.hung} write(s) hung past {HANG_AFTER}s"
    assert load.errors, "the outage should have failed some writes"
    assert all(isinstance(exc, (Neo4jError, DriverError)) for exc in load.errors)
    assert len(load.stats) == LOOPS
    for stats in load.stats:  # no lease lost
        assert stats["in_use"] == 0
        assert stats["available"] == stats["total"] <= stats["max_size"]
    assert load.leases_lost == 0
    lost = load.acknowledged - load.stored(server.uri, (server.username, server.password))
    assert not lost, f"{len(lost)} acknowledged write(s) are missing after the restart"


async def test_a_new_borrow_after_the_restart_succeeds_on_its_first_attempt(
    server: BoltServer, registry: GlobalNeo4jConnectionPool
) -> None:
    load = WriteLoad(1, 1, run_id=f"first-{time.time_ns()}")
    await load.write_once()  # the pool and its driver are open and warm

    await asyncio.to_thread(server.stop)
    with pytest.raises((Neo4jError, DriverError)):
        await load.write_once()
    await asyncio.to_thread(server.start)

    await load.write_once()  # no retry loop: the very next borrow works
    stats = (await registry.get_pool()).stats()
    assert stats["in_use"] == 0
    assert stats["total"] <= stats["max_size"]
