"""Writers on many event loops, for drills that break the server under load.

A fault drill needs steady traffic that counts what it got: which writes the
server acknowledged (and so must still be there afterwards), which failed,
which hung, and when each loop noticed the server go and come back.
:class:`WriteLoad` runs ``loops`` threads, each with its own event loop (as a
threads-pool Celery worker has), each with ``writers`` concurrent tasks that
borrow through neopool, ``CREATE`` one probe node and return, until stopped:

>>> load = WriteLoad(loops=4, writers=20, run_id="drill-1")      # doctest: +SKIP
>>> load.start(); load.wait(load.writing, 60)                     # doctest: +SKIP
>>> server.stop(); load.wait(load.failing, 60)                    # doctest: +SKIP
>>> server.start(); load.server_back(); load.wait(load.recovered, 60)  # doctest: +SKIP
>>> load.finish(); load.acknowledged - load.stored(uri, auth)     # doctest: +SKIP
set()
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from neo4j import AsyncGraphDatabase
from neo4j.exceptions import DriverError, Neo4jError

from neopool.factory import Neo4jConnectionFactory
from neopool.registry import GlobalNeo4jConnectionPool
from neopool.stats import PoolStats

#: The label of the probe nodes the writers create.
PROBE_LABEL = "WriteLoadProbe"

#: Settings for a drill (``server.config(**DRILL_SETTINGS)``): driver timeouts of seconds,
#: so writes fail soon after the server goes rather than after the 30 s defaults.
DRILL_SETTINGS: dict[str, Any] = {
    "pool_max_size": 10,
    "pool_min_size": 2,
    "connection_timeout": 2.0,
    "connection_acquisition_timeout": 2.0,
    "max_transaction_retry_time": 1.0,
}


@dataclass(eq=False)
class WriteLoad:
    """``loops`` event loops x ``writers`` writers, each writing one probe node per borrow.

    Everything it records is changed under :attr:`lock` by the loops' threads;
    read it once :meth:`finish` has returned.
    """

    loops: int
    writers: int
    run_id: str
    #: A write not done after this many seconds is cancelled and counted as hung.
    hang_after: float = 20.0
    #: Database the probes are written to.
    database: str = "neo4j"

    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    acknowledged: set[int] = field(default_factory=set, repr=False)
    errors: list[BaseException] = field(default_factory=list, repr=False)
    hung: int = 0
    #: Each loop's pool stats, taken when its writers have stopped.
    stats: list[PoolStats] = field(default_factory=list, repr=False)
    #: ``time.monotonic()`` of :meth:`server_back`, and of each loop's first write after it.
    back_at: float = 0.0
    recovered_at: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._back = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Per loop: set once it has written, once a write failed, once it wrote after the restart.
        self.writing = [threading.Event() for _ in range(self.loops)]
        self.failing = [threading.Event() for _ in range(self.loops)]
        self.recovered = [threading.Event() for _ in range(self.loops)]

    # -- driving it --------------------------------------------------------------------
    def start(self) -> WriteLoad:
        """Start every loop's thread (each runs ``asyncio.run``, so its pool closes with it)."""
        self._threads = [
            threading.Thread(
                target=asyncio.run, args=(self._loop_main(index),), name=f"write-load-{index}"
            )
            for index in range(self.loops)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def server_back(self) -> None:
        """Say the server is up again: from now on, each loop's first write is its recovery."""
        self.back_at = time.monotonic()
        self._back.set()

    @staticmethod
    def wait(events: list[threading.Event], timeout: float) -> bool:
        """Whether every event in ``events`` is set within ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        return all(event.wait(max(0.0, deadline - time.monotonic())) for event in events)

    def finish(self, timeout: float | None = None) -> bool:
        """Stop the writers and join the threads; ``False`` if a loop did not end in time."""
        self._stop.set()
        deadline = time.monotonic() + (2 * self.hang_after if timeout is None else timeout)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    # -- what it found -------------------------------------------------------------------
    @property
    def leases_lost(self) -> int:
        """Leases still out, or over ``max_size``, in the pools when the writers stopped."""
        return sum(s["in_use"] + max(0, s["total"] - s["max_size"]) for s in self.stats)

    def stored(self, uri: str, auth: tuple[str, str]) -> set[int]:
        """The probe ids of this run that the server has now, read with a driver of its own."""

        async def read() -> set[int]:
            driver = AsyncGraphDatabase.driver(uri, auth=auth)
            try:
                records, _, _ = await driver.execute_query(
                    f"MATCH (n:{PROBE_LABEL}) WHERE n.run = $run RETURN n.id AS id",
                    run=self.run_id,
                    database_=self.database,
                )
            finally:
                await driver.close()
            return {int(record["id"]) for record in records}

        return asyncio.run(read())

    # -- the writers ---------------------------------------------------------------------
    async def _loop_main(self, index: int) -> None:
        await asyncio.gather(*(self._writer(index) for _ in range(self.writers)))
        pool = await GlobalNeo4jConnectionPool().get_pool()
        with self.lock:
            self.stats.append(pool.stats())

    async def _writer(self, index: int) -> None:
        while not self._stop.is_set():
            attempt = asyncio.ensure_future(self.write_once())
            done, _ = await asyncio.wait({attempt}, timeout=self.hang_after)
            if not done:
                attempt.cancel()
                with self.lock:
                    self.hung += 1
                continue
            try:
                probe = attempt.result()
            except (Neo4jError, DriverError) as exc:
                with self.lock:
                    self.errors.append(exc)
                self.failing[index].set()
                await asyncio.sleep(0.05)  # a real worker would back off too
                continue
            self._acknowledge(index, probe)

    def _acknowledge(self, index: int, probe: int) -> None:
        with self.lock:
            self.acknowledged.add(probe)
            if self._back.is_set() and not self.recovered[index].is_set():
                self.recovered_at.append(time.monotonic())
                self.recovered[index].set()
        self.writing[index].set()

    async def write_once(self) -> int:
        """Borrow on the running loop, write one probe, return; the probe's id."""
        with self.lock:
            probe = next(self._ids)
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            driver = await borrowed.get_driver()
            await driver.execute_query(
                f"CREATE (:{PROBE_LABEL} {{run: $run, id: $id}})",
                run=self.run_id,
                id=probe,
                database_=self.database,
            )
        return probe

    def __repr__(self) -> str:
        return (
            f"<WriteLoad {self.loops} loops x {self.writers} writers: "
            f"{len(self.acknowledged)} acknowledged, {len(self.errors)} failed, {self.hung} hung>"
        )
