"""Reliability figures: restart recovery, lost leases and writes, soak growth, stress waits.

1. Restart: 4 loops x 20 borrowers write through neopool while an embedded
   Bolt server is stopped and started again. Reports how long after the
   restart every loop wrote again (from ``start()`` returning, and from the
   moment a fresh driver could first query), leases lost (pools not back to
   ``in_use == 0`` or over ``max_size``) and acknowledged writes missing from
   the database afterwards. Needs the embedded server (skipped with NEO4J_URI).
2. Network faults through the TCP proxy: time until a borrower gets its error
   under a blackhole, and until the next borrow works after every connection
   is cut.
3. Soak: 10,000 borrow / query / return cycles on one loop: resident memory
   growth and file-descriptor delta after a warm-up.
4. Stress: 16 threads, each its own loop, 200 borrows each with random
   cancellation: the longest wait for a lease, leases lost, elapsed time.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from neo4j import AsyncGraphDatabase
from neo4j.exceptions import DriverError, Neo4jError

from common import Target, bolt_target, parser, save, table
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory, PoolStats
from neopool.testing import TcpProxy, WriteLoad, reset_registry
from neopool.testing.write_load import DRILL_SETTINGS


def _open_fds() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


async def _query(database: str, query: str = "RETURN 1", **params: Any) -> None:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        async with driver.session(database=database) as session:
            await (await session.run(query, **params)).consume()


# -- 1. restart --------------------------------------------------------------------
async def _first_answer(uri: str, auth: tuple[str, str], deadline: float) -> float:
    """When a brand-new driver first gets an answer: the server is really back."""
    while time.monotonic() < deadline:
        driver = AsyncGraphDatabase.driver(uri, auth=auth, connection_timeout=1.0)
        try:
            await driver.execute_query("RETURN 1", database_="neo4j")
            return time.monotonic()
        except (Neo4jError, DriverError, OSError):
            await asyncio.sleep(0.02)
        finally:
            await driver.close()
    return float("nan")


def restart(loops: int = 4, borrowers: int = 20) -> dict[str, Any]:
    from neopool.embedded import BoltServer

    with BoltServer() as server:
        reset_registry()
        GlobalNeo4jConnectionPool.set_config(server.config(**DRILL_SETTINGS))
        load = WriteLoad(loops, borrowers, run_id=f"bench-{time.time_ns()}", hang_after=30.0)
        load.start()
        try:
            load.wait(load.writing, 60)
            stopped_at = time.monotonic()
            server.stop()
            load.wait(load.failing, 60)
            server.start()
            load.server_back()
            answered_at = asyncio.run(
                _first_answer(server.uri, (server.username, server.password), load.back_at + 60)
            )
            load.wait(load.recovered, 60)
        finally:
            load.finish()
        in_db = load.stored(server.uri, (server.username, server.password))
        reset_registry()
    started_at = load.back_at
    all_back = max(load.recovered_at) if len(load.recovered_at) == loops else float("nan")
    return {
        "loops": loops,
        "borrowers_per_loop": borrowers,
        "outage_s": round(started_at - stopped_at, 3),
        "recovery_after_start_s": round(all_back - started_at, 3),
        "recovery_after_server_answers_s": round(max(0.0, all_back - answered_at), 3),
        "server_answers_after_start_s": round(answered_at - started_at, 3),
        "writes_acknowledged": len(load.acknowledged),
        "acknowledged_writes_lost": len(load.acknowledged - in_db),
        "failed_attempts": len(load.errors),
        "hung_attempts": load.hung,
        "leases_lost": load.leases_lost,
        "pools_reporting": len(load.stats),
    }


# -- 2. network faults ------------------------------------------------------------------
def network_faults(target: Target) -> dict[str, Any]:
    parts = urlsplit(target.uri)
    assert parts.hostname is not None
    assert parts.port is not None
    with TcpProxy(parts.hostname, parts.port) as proxy:
        reset_registry()
        GlobalNeo4jConnectionPool.set_config(
            _proxied_config(target, proxy.uri(), connection_timeout=1.0)
        )

        async def measure() -> dict[str, Any]:
            await _query(target.database)
            proxy.cut_all()
            cut_started = time.monotonic()
            cut_errors = 0
            while True:
                try:
                    await _query(target.database)
                    break
                except (Neo4jError, DriverError):
                    cut_errors += 1
            cut_heal = time.monotonic() - cut_started

            proxy.set_blackhole(True)
            proxy.cut_all()
            errors: list[str] = []
            durations: list[float] = []
            for _ in range(3):  # the first may just find a dead socket; later ones must connect
                started = time.monotonic()
                try:
                    await _query(target.database)
                    errors.append("none")
                except (Neo4jError, DriverError) as exc:
                    errors.append(type(exc).__name__)
                durations.append(time.monotonic() - started)
            blackhole_error = max(durations)
            error = "/".join(sorted(set(errors)))
            proxy.set_blackhole(False)
            started = time.monotonic()
            await _query(target.database)
            blackhole_heal = time.monotonic() - started
            pool = await GlobalNeo4jConnectionPool().get_pool()
            return {
                "cut_failed_borrows_before_success": cut_errors,
                "cut_next_success_s": round(cut_heal, 3),
                "blackhole_error": error,
                "blackhole_time_to_error_s": round(blackhole_error, 3),
                "blackhole_next_success_s": round(blackhole_heal, 3),
                "in_use_after": pool.in_use,
            }

        result = asyncio.run(measure())
        reset_registry()
    return result


def _proxied_config(target: Target, uri: str, **settings: Any) -> Any:
    """Short timeouts and no retries: the figures show the pool, not the driver's retry loop."""
    return Target(uri, target.username, target.password, target.database).config(
        max_transaction_retry_time=0.0, connection_acquisition_timeout=1.0, **settings
    )


# -- 3. soak -----------------------------------------------------------------------------
def soak(target: Target, cycles: int, concurrency: int = 4) -> dict[str, Any]:
    reset_registry()
    GlobalNeo4jConnectionPool.set_config(target.config(pool_max_size=4, pool_min_size=1))

    async def batch(count: int) -> None:
        async def worker(n: int) -> None:
            for _ in range(n):
                await _query(target.database)

        await asyncio.gather(*(worker(count // concurrency) for _ in range(concurrency)))

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(batch(1_000))
        gc.collect()
        rss0, fds0 = _rss(), _open_fds()
        started = time.perf_counter()
        loop.run_until_complete(batch(cycles))
        elapsed = time.perf_counter() - started
        gc.collect()
        rss1, fds1 = _rss(), _open_fds()
        stats = loop.run_until_complete(GlobalNeo4jConnectionPool().get_pool()).stats()
        loop.run_until_complete(GlobalNeo4jConnectionPool().close_all_pools())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
        reset_registry()
    return {
        "cycles": cycles,
        "elapsed_s": round(elapsed, 2),
        "cycles_per_s": round(cycles / elapsed, 1),
        "rss_growth_mb": round((rss1 - rss0) / 2**20, 3),
        "fd_delta": fds1 - fds0,
        "in_use_after": stats["in_use"],
        "drivers_created": stats["drivers_created"],
    }


# -- 4. stress -----------------------------------------------------------------------------
def stress(target: Target, threads: int = 16, borrows: int = 200) -> dict[str, Any]:
    reset_registry()
    GlobalNeo4jConnectionPool.set_config(
        target.config(pool_max_size=3, pool_min_size=1, max_connection_pool_size=4)
    )
    stats: list[PoolStats] = []
    cancelled = [0]
    lock = threading.Lock()

    async def main(seed: int) -> None:
        rng = random.Random(seed)
        remaining = [borrows]

        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                attempt = asyncio.ensure_future(_query(target.database))
                if rng.random() < 0.33:
                    await asyncio.sleep(rng.random() * 0.003)
                    attempt.cancel()
                try:
                    await attempt
                except asyncio.CancelledError:
                    with lock:
                        cancelled[0] += 1

        await asyncio.gather(*(worker() for _ in range(6)))
        pool = await GlobalNeo4jConnectionPool().get_pool()
        with lock:
            stats.append(pool.stats())

    workers = [threading.Thread(target=asyncio.run, args=(main(i),)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
    elapsed = time.perf_counter() - started
    reset_registry()
    return {
        "threads": threads,
        "borrows_per_thread": borrows,
        "cancelled": cancelled[0],
        "deadlocked_threads": sum(w.is_alive() for w in workers),
        "elapsed_s": round(elapsed, 2),
        "longest_wait_ms": max(s["max_wait_ms"] for s in stats) if stats else float("nan"),
        "timeouts": sum(s["timeouts"] for s in stats),
        "leases_lost": sum(s["in_use"] for s in stats),
    }


def main() -> None:
    logging.getLogger("neopool").setLevel(logging.ERROR)  # utilisation warnings are expected
    logging.getLogger("neo4j").setLevel(logging.CRITICAL)
    cli = parser(__doc__.splitlines()[0])
    cli.set_defaults(rtt_ms=[0.0])
    options = cli.parse_args()
    cycles = 2_000 if options.quick else 10_000
    results: dict[str, Any] = {}
    if os.environ.get("NEO4J_URI"):
        results["restart"] = {"skipped": "needs the embedded server (NEO4J_URI is set)"}
    else:
        results["restart"] = restart()
    with bolt_target() as target:
        results["network_faults"] = network_faults(target)
        results["soak"] = soak(target, cycles)
        results["stress"] = stress(target)

    r, n, s, t = (results[k] for k in ("restart", "network_faults", "soak", "stress"))
    rows: list[list[Any]] = []
    if "skipped" not in r:
        rows += [
            ["restart", "recovery after start() returned", f"{r['recovery_after_start_s']} s"],
            [
                "restart",
                "recovery after the server first answers",
                f"{r['recovery_after_server_answers_s']} s",
            ],
            ["restart", "leases lost", r["leases_lost"]],
            [
                "restart",
                "acknowledged writes lost",
                f"{r['acknowledged_writes_lost']} of {r['writes_acknowledged']}",
            ],
            ["restart", "hung attempts", r["hung_attempts"]],
        ]
    rows += [
        ["cut_all", "next successful borrow", f"{n['cut_next_success_s']} s"],
        [
            "blackhole",
            f"longest time to {n['blackhole_error']} (connection_timeout 1 s)",
            f"{n['blackhole_time_to_error_s']} s",
        ],
        ["blackhole", "next success once lifted", f"{n['blackhole_next_success_s']} s"],
        ["soak", f"RSS growth over {s['cycles']} cycles", f"{s['rss_growth_mb']} MB"],
        ["soak", "file descriptor delta", s["fd_delta"]],
        ["soak", "throughput", f"{s['cycles_per_s']} cycles/s"],
        ["stress", "longest wait for a lease", f"{t['longest_wait_ms']} ms"],
        [
            "stress",
            "leases lost / deadlocked threads",
            f"{t['leases_lost']} / {t['deadlocked_threads']}",
        ],
    ]
    table("neopool reliability", ["scenario", "figure", "value"], rows)
    save("reliability", results, options.json)


if __name__ == "__main__":
    main()
