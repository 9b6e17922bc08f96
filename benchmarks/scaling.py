"""Scaling benchmark: many event loops (threads) times many concurrent borrowers.

For 1, 4, 16 and 64 loops, each in its own thread with its own pool, and 1,
10 and 100 concurrent borrowers per loop (each one: borrow, one query,
return, again and again): throughput, p50/p99 wait for a lease, and how they
grow. Then the memory of an idle loop pool beyond its driver, per loop, for
the same loop counts (tracemalloc, so only Python allocations are counted).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import tracemalloc
from typing import Any

from neo4j import AsyncDriver

from common import Target, bolt_target, network, network_label, parser, save, table
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionConfig
from neopool.demo.report import percentile
from neopool.loop_pool import create_driver

LOOPS = (1, 4, 16, 64)
BORROWERS = (1, 10, 100)
QUERY = "RETURN 1 AS x"


class Cell:
    """One (loops, borrowers) measurement: every thread adds its figures here."""

    def __init__(self, loops: int, seconds: float) -> None:
        self.seconds = seconds
        self.ready = threading.Barrier(loops + 1, action=self._go)
        self.lock = threading.Lock()
        self.waits_ms: list[float] = []
        self.completed = 0
        self.errors = 0
        self.start = 0.0
        self.deadline = 0.0

    def _go(self) -> None:
        """Runs once every loop is warm, before any is released: the clock starts now."""
        self.start = time.perf_counter()
        self.deadline = self.start + self.seconds


async def borrower_loop(cell: Cell, borrowers: int, database: str) -> None:
    registry = GlobalNeo4jConnectionPool()
    pool = await registry.get_pool()

    async def once() -> float:
        asked = time.perf_counter()
        lease = await pool.borrow()
        waited = (time.perf_counter() - asked) * 1000.0
        try:
            driver = await lease.get_driver()
            async with driver.session(database=database) as session:
                await (await session.run(QUERY)).consume()
        finally:
            await pool.return_connection(lease)
        return waited

    await asyncio.gather(*(once() for _ in range(borrowers)))  # warm: sockets open
    await asyncio.to_thread(cell.ready.wait)
    waits: list[float] = []
    completed = errors = 0

    async def borrower() -> None:
        nonlocal completed, errors
        while time.perf_counter() < cell.deadline:
            try:
                waits.append(await once())
            except Exception:
                errors += 1
                continue
            if time.perf_counter() <= cell.deadline:
                completed += 1

    await asyncio.gather(*(borrower() for _ in range(borrowers)))
    with cell.lock:
        cell.waits_ms.extend(waits)
        cell.completed += completed
        cell.errors += errors


def run_cell(target: Target, loops: int, borrowers: int, seconds: float) -> dict[str, Any]:
    cell = Cell(loops, seconds)
    failures: list[BaseException] = []

    def thread_main() -> None:
        try:
            asyncio.run(borrower_loop(cell, borrowers, target.database))
        except BaseException as exc:
            failures.append(exc)
            cell.ready.abort()  # nobody waits forever for a thread that died

    threads = [threading.Thread(target=thread_main, daemon=True) for _ in range(loops)]
    for thread in threads:
        thread.start()
    try:
        cell.ready.wait()
    finally:
        for thread in threads:
            thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} loop(s) failed: {failures[0]!r}") from failures[0]
    return {
        "loops": loops,
        "borrowers_per_loop": borrowers,
        "tasks_per_s": round(cell.completed / seconds, 1),
        "wait_p50_ms": round(percentile(cell.waits_ms, 0.5), 3),
        "wait_p99_ms": round(percentile(cell.waits_ms, 0.99), 3),
        "completed": cell.completed,
        "errors": cell.errors,
    }


# -- memory of an idle loop pool ---------------------------------------------------------
def idle_pool_memory(config: Neo4jConnectionConfig, loops: int) -> dict[str, Any]:
    """Python bytes per idle loop pool beyond its driver, with ``loops`` loops alive.

    Each thread opens and warms a driver first (measured separately), then the
    pool is created around that very driver, so the second figure is the pool alone.
    """
    drivers: dict[int, AsyncDriver] = {}
    drivers_ready = threading.Barrier(loops + 1)
    make_pools = threading.Event()
    pools_ready = threading.Barrier(loops + 1)
    finish = threading.Event()

    async def live() -> None:
        driver = create_driver(config)
        await asyncio.gather(*(driver.verify_connectivity() for _ in range(config.pool_min_size)))
        drivers[threading.get_ident()] = driver
        await asyncio.to_thread(drivers_ready.wait)
        await asyncio.to_thread(make_pools.wait)
        registry = GlobalNeo4jConnectionPool()
        await registry.return_connection(await registry.borrow_connection())
        await asyncio.to_thread(pools_ready.wait)
        await asyncio.to_thread(finish.wait)

    registry = GlobalNeo4jConnectionPool()
    registry.set_config(config)
    registry.set_driver_factory(lambda _config: drivers[threading.get_ident()])
    threads = [
        threading.Thread(target=asyncio.run, args=(live(),), daemon=True) for _ in range(loops)
    ]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for thread in threads:
            thread.start()
        drivers_ready.wait()
        time.sleep(0.2)  # let the threads settle into their waits
        gc.collect()
        with_drivers = tracemalloc.get_traced_memory()[0]
        make_pools.set()
        pools_ready.wait()
        time.sleep(0.2)
        gc.collect()
        with_pools = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        finish.set()
        for thread in threads:
            thread.join()
        registry.set_driver_factory()
    return {
        "loops": loops,
        "driver_kb_per_loop": round((with_drivers - before) / loops / 1024, 1),
        "pool_kb_per_loop_beyond_driver": round((with_pools - with_drivers) / loops / 1024, 1),
    }


def main() -> None:
    cli = parser(__doc__ or "")
    cli.set_defaults(rtt_ms=[0.0])
    args = cli.parse_args()
    seconds = 0.5 if args.quick else 2.0
    results: dict[str, Any] = {"query": QUERY, "seconds_per_cell": seconds, "networks": {}}
    # ArcadeDB queues at most 256 queries by default; 64 loops x 10 leases exceed that.
    with bolt_target(java_options=("-Darcadedb.queryQueueMaxSize=4096",)) as server:
        for rtt in args.rtt_ms:
            label = network_label(rtt)
            with network(server, rtt) as target:
                cells = []
                for loops in LOOPS:
                    GlobalNeo4jConnectionPool.set_config(
                        target.config(max_connection_pool_size=10, pool_max_size=10)
                    )
                    for borrowers in BORROWERS:
                        cells.append(run_cell(target, loops, borrowers, seconds))
                        print(f"  {label}: {loops} loops x {borrowers} borrowers done", flush=True)
                results["networks"][label] = {"cells": cells}
        results["idle_pool_memory"] = [idle_pool_memory(server.config(), loops) for loops in LOOPS]
    report(results)
    save("scaling", results, args.json)


def report(results: dict[str, Any]) -> None:
    for label, figures in results["networks"].items():
        cells = figures["cells"]
        base = {c["borrowers_per_loop"]: c["tasks_per_s"] for c in cells if c["loops"] == 1}
        table(
            f"scaling, {label}: borrow, one query, return (pool_max_size=10 per loop)",
            ["loops x borrowers", "tasks/s", "vs 1 loop", "wait p50 ms", "wait p99 ms", "errors"],
            [
                [
                    f"{c['loops']} x {c['borrowers_per_loop']}",
                    c["tasks_per_s"],
                    f"{c['tasks_per_s'] / base[c['borrowers_per_loop']]:.2f}x"
                    if base.get(c["borrowers_per_loop"])
                    else "-",
                    c["wait_p50_ms"],
                    c["wait_p99_ms"],
                    c["errors"],
                ]
                for c in cells
            ],
        )
    table(
        "memory per idle loop (tracemalloc, Python allocations)",
        ["loops", "driver KB per loop", "pool KB per loop beyond its driver"],
        [
            [m["loops"], m["driver_kb_per_loop"], m["pool_kb_per_loop_beyond_driver"]]
            for m in results["idle_pool_memory"]
        ],
    )


if __name__ == "__main__":
    main()
