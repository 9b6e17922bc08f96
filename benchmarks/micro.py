"""Micro benchmark: what a borrow costs, with and without a query around it.

1. No I/O: borrow+return pairs on a warmed pool in a tight loop (µs per pair),
   next to the same loop over an ``asyncio.Semaphore``.
2. One query per task, side by side in one run, interleaved task by task so
   drift and noise hit every variant alike:
   - the raw shared driver (the physical limit),
   - an ``asyncio.Semaphore`` around the shared driver,
   - neopool: borrow, one query, return,
   - a new driver per query (connect, handshake, authenticate, query, close).
   On loopback and through the latency proxy (``--rtt-ms``).
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from neo4j import AsyncDriver

from common import Target, bolt_target, network, network_label, parser, save, table
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory
from neopool.demo.report import summarise_ms
from neopool.loop_pool import create_driver

QUERY = "RETURN 1 AS x"


# -- 1. no I/O -------------------------------------------------------------------
async def no_io(iterations: int, repeats: int) -> dict[str, Any]:
    """µs per borrow+return pair, for each way of borrowing, and for a semaphore."""
    registry = GlobalNeo4jConnectionPool()
    pool = await registry.get_pool()
    await pool.return_connection(await pool.borrow())  # the driver is open and warm
    semaphore = asyncio.Semaphore(pool.max_size)

    async def pool_pairs(n: int) -> None:
        for _ in range(n):
            lease = await pool.borrow()
            await pool.return_connection(lease)

    async def registry_pairs(n: int) -> None:
        for _ in range(n):
            lease = await registry.borrow_connection()
            await registry.return_connection(lease)

    async def factory_pairs(n: int) -> None:
        for _ in range(n):
            async with Neo4jConnectionFactory.borrow_connection():
                pass

    async def semaphore_pairs(n: int) -> None:
        for _ in range(n):
            async with semaphore:
                pass

    variants: dict[str, Callable[[int], Awaitable[None]]] = {
        "EventLoopConnectionPool.borrow + return_connection": pool_pairs,
        "GlobalNeo4jConnectionPool.borrow_connection + return": registry_pairs,
        "async with Neo4jConnectionFactory.borrow_connection()": factory_pairs,
        "asyncio.Semaphore (async with)": semaphore_pairs,
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():  # warm-up
        await run(iterations // 10 or 1)
    gc.collect()
    for _ in range(repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            await run(iterations)
            samples[name].append((time.perf_counter() - started) / iterations * 1e6)
    return {
        name: {
            "us_per_pair_median": round(statistics.median(s), 3),
            "us_per_pair_min": round(min(s), 3),
        }
        for name, s in samples.items()
    }


# -- 2. one query ------------------------------------------------------------------
async def run_query(driver: AsyncDriver, database: str) -> None:
    async with driver.session(database=database) as session:
        result = await session.run(QUERY)
        await result.consume()


async def one_query(target: Target, tasks: int) -> dict[str, Any]:
    """Per-task latency of the four variants, interleaved task by task."""
    config = target.config()
    shared = create_driver(config)  # the same settings the pool's driver gets
    await shared.verify_connectivity()
    semaphore = asyncio.Semaphore(config.pool_max_size)
    db = target.database

    async def raw() -> None:
        await run_query(shared, db)

    async def with_semaphore() -> None:
        async with semaphore:
            await run_query(shared, db)

    async def pooled() -> None:
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            await run_query(await borrowed.get_driver(), db)

    async def new_driver() -> None:
        driver = create_driver(config)
        try:
            await run_query(driver, db)
        finally:
            await driver.close()

    variants: dict[str, Callable[[], Awaitable[None]]] = {
        "raw shared driver (the limit)": raw,
        "asyncio.Semaphore + shared driver": with_semaphore,
        "neopool: borrow, query, return": pooled,
        "new driver per query": new_driver,
    }
    names = list(variants)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: sockets open, code paths hot
        for _ in range(5):
            await variants[name]()
    for index in range(tasks):
        shift = index % len(names)  # rotate the order so no variant always goes first
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            await variants[name]()
            latencies[name].append((time.perf_counter() - started) * 1000.0)
    await shared.close()
    return {name: {"tasks": len(v), **summarise_ms(v)} for name, v in latencies.items()}


def one_query_ratios(results: dict[str, Any]) -> dict[str, float]:
    raw = results["raw shared driver (the limit)"]
    sem = results["asyncio.Semaphore + shared driver"]
    pooled = results["neopool: borrow, query, return"]
    new = results["new driver per query"]
    return {
        "new_driver_over_pooled_mean": round(new["mean_ms"] / pooled["mean_ms"], 2),
        "new_driver_over_pooled_p50": round(new["p50_ms"] / pooled["p50_ms"], 2),
        "pool_overhead_vs_raw_us": round((pooled["mean_ms"] - raw["mean_ms"]) * 1000, 1),
        "pool_overhead_vs_raw_pct_mean": round(100 * (pooled["mean_ms"] / raw["mean_ms"] - 1), 2),
        "pool_overhead_vs_raw_pct_p50": round(100 * (pooled["p50_ms"] / raw["p50_ms"] - 1), 2),
        "pooled_vs_semaphore_pct_mean": round(100 * (pooled["mean_ms"] / sem["mean_ms"] - 1), 2),
    }


def measure(target: Target, rtt_ms: float, quick: bool) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        registry = GlobalNeo4jConnectionPool()
        registry.set_config(target.config())
        try:
            out: dict[str, Any] = {}
            if rtt_ms <= 0:
                out["no_io"] = await no_io(2_000 if quick else 20_000, 3 if quick else 7)
            tasks = 40 if quick else (300 if rtt_ms <= 0 else 200)
            out["one_query"] = await one_query(target, tasks)
            out["ratios"] = one_query_ratios(out["one_query"])
            return out
        finally:
            await registry.close_all_pools()

    return asyncio.run(main())


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    results: dict[str, Any] = {"query": QUERY, "networks": {}}
    with bolt_target() as server:
        for rtt in args.rtt_ms:
            with network(server, rtt) as target:
                results["networks"][network_label(rtt)] = measure(target, rtt, args.quick)
    report(results)
    save("micro", results, args.json)


def report(results: dict[str, Any]) -> None:
    for label, figures in results["networks"].items():
        if "no_io" in figures:
            table(
                "borrow + return with no I/O (warmed pool, tight loop)",
                ["variant", "µs/pair (median)", "µs/pair (min)"],
                [
                    [name, f["us_per_pair_median"], f["us_per_pair_min"]]
                    for name, f in figures["no_io"].items()
                ],
            )
        table(
            f"one query per task, {label} (ms, interleaved side by side)",
            ["variant", "tasks", "mean", "p50", "p95", "p99"],
            [
                [name, f["tasks"], f["mean_ms"], f["p50_ms"], f["p95_ms"], f["p99_ms"]]
                for name, f in figures["one_query"].items()
            ],
        )
        ratios = figures["ratios"]
        table(
            f"ratios, {label}",
            ["figure", "value"],
            [
                [
                    "new driver per query / neopool (mean)",
                    f"{ratios['new_driver_over_pooled_mean']}x",
                ],
                [
                    "new driver per query / neopool (p50)",
                    f"{ratios['new_driver_over_pooled_p50']}x",
                ],
                ["neopool over raw shared driver (µs, mean)", ratios["pool_overhead_vs_raw_us"]],
                [
                    "neopool over raw shared driver (% of mean)",
                    ratios["pool_overhead_vs_raw_pct_mean"],
                ],
                [
                    "neopool over raw shared driver (% of p50)",
                    ratios["pool_overhead_vs_raw_pct_p50"],
                ],
                [
                    "neopool vs Semaphore + shared driver (% mean)",
                    ratios["pooled_vs_semaphore_pct_mean"],
                ],
            ],
        )


if __name__ == "__main__":
    main()
