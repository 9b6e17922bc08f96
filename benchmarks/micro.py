"""Micro benchmark: what a borrow costs, with and without a query around it.

1. No I/O: borrow+return pairs on a warmed pool in a tight loop (µs per pair),
   next to the same loop over an ``asyncio.Semaphore``.
2. One query per task, in two experiments of one run, each interleaved round by
   round in a random order so drift and noise hit every variant alike:
   - overhead: the raw shared driver (the physical limit), an ``asyncio.Semaphore``
     around it, and neopool (borrow, one query, return);
   - speed-up: neopool against a new driver per query (connect, handshake,
     authenticate, query, close).
3. Concurrent borrowers: 1, 10 and 50 borrowers on one loop, each doing one
   query after another for a fixed time, the raw shared driver against
   neopool, in rounds of a new random order; neopool's figure is the median of
   its throughput over the raw driver's within each round (paired).
   On loopback and through the latency proxy (``--rtt-ms``), over plain Bolt and
   over TLS (``--transport``): a proxy process terminates TLS, with the latency in
   front of it, so a new driver pays the TLS handshake's round trips too.
"""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from neo4j import AsyncDriver

from common import Target, bolt_target, network, network_label, networks, parser, save, table
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory
from neopool.demo.report import summarise_ms
from neopool.loop_pool import create_driver

QUERY = "RETURN 1 AS x"
RAW = "raw shared driver (the limit)"
SEMAPHORE = "asyncio.Semaphore + shared driver"
POOLED = "neopool: borrow, query, return"
NEW = "new driver per query"
#: Calls in a row of one variant, against a new driver per query (see one_query).
VERSUS_BLOCK = 20
#: Concurrent borrowers on one loop (experiment 3), and its settings: every borrower
#: gets a lease and a socket (as in ``to_thread.py``), so only the pool's own cost differs.
CONCURRENT = (1, 10, 50)
CONCURRENT_SOCKETS = 50
#: The two one-query experiments: their keys in the results, and their titles.
EXPERIMENTS = {
    "overhead": "what neopool adds",
    "versus_new_driver": "against a new driver per query",
}


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


async def interleaved(
    variants: dict[str, Callable[[], Awaitable[None]]], rounds: int, block: int = 1
) -> dict[str, list[float]]:
    """Milliseconds per call of each variant, run round by round in a new random order.

    Each round runs every variant ``block`` times in a row, so drift hits them
    alike; the order is drawn anew each round, so no variant always goes first or
    follows the same one.
    """
    names = list(variants)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: sockets open, code paths hot
        for _ in range(20):
            await variants[name]()
    order = random.Random(0)
    for _ in range(rounds):
        names = order.sample(names, len(names))
        for name in names:
            for _ in range(block):
                started = time.perf_counter()
                await variants[name]()
                latencies[name].append((time.perf_counter() - started) * 1000.0)
    return latencies


async def one_query(target: Target, rounds: int) -> dict[str, Any]:
    """Two experiments, each interleaved: what neopool adds, and what it saves.

    1. Overhead: the raw shared driver (the physical limit), an ``asyncio.Semaphore``
       around it, and neopool. Fine differences (microseconds), so nothing else runs.
    2. Against a new driver per query. Kept apart from the first, and run in blocks
       of ``VERSUS_BLOCK`` calls: a new driver leaves the server a connection to tear
       down after ``close()`` returns, and that work lands on whatever runs next.
    """
    config = target.config()
    # The pool's own driver, used without borrowing: the same driver and socket for every
    # variant, so what differs is only what wraps the query.
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        shared = await borrowed.get_driver()
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

    overhead = await interleaved({RAW: raw, SEMAPHORE: with_semaphore, POOLED: pooled}, rounds)
    versus = await interleaved(
        {POOLED: pooled, NEW: new_driver},
        max(1, rounds // 3 // VERSUS_BLOCK),
        block=VERSUS_BLOCK,
    )
    return {
        "overhead": summarise(overhead),
        "overhead_paired_us": paired_differences_us(overhead),
        "versus_new_driver": summarise(versus),
    }


# -- 3. concurrent borrowers -------------------------------------------------------------
async def throughput(
    call: Callable[[], Awaitable[None]], borrowers: int, seconds: float
) -> tuple[float, float]:
    """Calls per second of ``borrowers`` coroutines calling ``call`` one after another,
    and this process's CPU µs per call.

    Calls that end in the first fifth of the window are not counted (every
    borrower is under way after it); calls still running at the end are
    waited for, so nothing overlaps the next window. The CPU time (of every
    thread of this process, not the server's) is a steadier figure than the
    throughput on a busy machine, where others' work decides the wall clock.
    """
    begin = time.perf_counter()
    cpu = time.process_time()
    counted_from, deadline = begin + seconds / 5, begin + seconds
    counted = calls = 0

    async def borrower() -> None:
        nonlocal counted, calls
        while time.perf_counter() < deadline:
            await call()
            calls += 1
            if counted_from <= time.perf_counter() <= deadline:
                counted += 1

    await asyncio.gather(*(borrower() for _ in range(borrowers)))
    cpu_us = (time.process_time() - cpu) / max(calls, 1) * 1e6
    return counted / (seconds * 4 / 5), cpu_us


async def concurrent(target: Target, rounds: int, seconds: float) -> dict[str, Any]:
    """neopool against the raw shared driver at each of ``CONCURRENT`` borrowers."""
    config = target.config(
        max_connection_pool_size=CONCURRENT_SOCKETS, pool_max_size=CONCURRENT_SOCKETS
    )
    registry = GlobalNeo4jConnectionPool()
    registry.set_config(config)
    # The raw rows use the pool's own driver, without borrowing: the same driver, the
    # same sockets, so what differs is only the borrow. (Two drivers hold different
    # server connections, whose speed differs by a few percent for the server's reasons.)
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        shared = await borrowed.get_driver()
    db = target.database

    async def raw() -> None:
        await run_query(shared, db)

    async def pooled() -> None:
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            await run_query(await borrowed.get_driver(), db)

    variants = {RAW: raw, POOLED: pooled}
    cells = []
    try:
        for borrowers in CONCURRENT:
            for call in variants.values():  # warm-up: every socket open
                await throughput(call, borrowers, seconds / 2)
            per_round: dict[str, list[float]] = {name: [] for name in variants}
            cpu: dict[str, list[float]] = {name: [] for name in variants}
            order = random.Random(borrowers)
            for _ in range(rounds):
                for name in order.sample(list(variants), len(variants)):
                    rate, cpu_us = await throughput(variants[name], borrowers, seconds)
                    per_round[name].append(rate)
                    cpu[name].append(cpu_us)
            ratio = statistics.median(
                p / r for p, r in zip(per_round[POOLED], per_round[RAW], strict=True) if r
            )
            cpu_ratio = statistics.median(
                p / r for p, r in zip(cpu[POOLED], cpu[RAW], strict=True) if r
            )
            cells.append(
                {
                    "borrowers": borrowers,
                    "tasks_per_s": {
                        name: round(statistics.median(v), 1) for name, v in per_round.items()
                    },
                    "cpu_us_per_task": {
                        name: round(statistics.median(v), 1) for name, v in cpu.items()
                    },
                    "pooled_over_raw_pct": round(100 * (ratio - 1), 2),
                    "pooled_cpu_over_raw_pct": round(100 * (cpu_ratio - 1), 2),
                }
            )
    finally:
        await registry.close_all_pools()
    return {"cells": cells, "rounds": rounds, "seconds_per_window": seconds}


def summarise(latencies: dict[str, list[float]]) -> dict[str, Any]:
    return {name: {"tasks": len(v), **summarise_ms(v)} for name, v in latencies.items()}


def paired_differences_us(latencies: dict[str, list[float]]) -> dict[str, float]:
    """neopool's cost over each baseline: the median of its difference within each round.

    Pairing cancels what a round's neighbours did to it, and the median ignores the
    rare pause (the server's JVM, a garbage collection) that decides a mean of
    sub-millisecond queries.
    """
    pooled = latencies[POOLED]
    return {
        baseline: round(
            statistics.median(p - b for p, b in zip(pooled, latencies[baseline], strict=True))
            * 1000.0,
            1,
        )
        for baseline in (RAW, SEMAPHORE)
    }


def one_query_ratios(results: dict[str, Any]) -> dict[str, float]:
    overhead, paired_us = results["overhead"], results["overhead_paired_us"]
    raw, sem, pooled = overhead[RAW], overhead[SEMAPHORE], overhead[POOLED]
    versus = results["versus_new_driver"]
    new, pooled_vs_new = versus[NEW], versus[POOLED]
    return {
        "new_driver_over_pooled_mean": round(new["mean_ms"] / pooled_vs_new["mean_ms"], 2),
        "new_driver_over_pooled_p50": round(new["p50_ms"] / pooled_vs_new["p50_ms"], 2),
        "pool_overhead_vs_raw_us": round((pooled["mean_ms"] - raw["mean_ms"]) * 1000, 1),
        "pool_overhead_vs_raw_pct_mean": round(100 * (pooled["mean_ms"] / raw["mean_ms"] - 1), 2),
        "pool_overhead_vs_raw_pct_p50": round(100 * (pooled["p50_ms"] / raw["p50_ms"] - 1), 2),
        "pooled_vs_semaphore_pct_mean": round(100 * (pooled["mean_ms"] / sem["mean_ms"] - 1), 2),
        "pool_overhead_vs_raw_us_paired": paired_us[RAW],
        "pool_overhead_vs_raw_pct_paired": round(100 * paired_us[RAW] / (raw["p50_ms"] * 1000), 2),
        "pooled_vs_semaphore_us_paired": paired_us[SEMAPHORE],
        "pooled_vs_semaphore_pct_paired": round(
            100 * paired_us[SEMAPHORE] / (sem["p50_ms"] * 1000), 2
        ),
    }


def measure(target: Target, rtt_ms: float, quick: bool, with_no_io: bool) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        registry = GlobalNeo4jConnectionPool()
        registry.set_config(target.config())
        try:
            out: dict[str, Any] = {}
            if with_no_io:
                out["no_io"] = await no_io(2_000 if quick else 20_000, 3 if quick else 7)
            # Thousands of rounds on loopback: a query takes a fifth of a millisecond
            # there, so a few pauses of the server's JVM would otherwise decide the means.
            rounds = 60 if quick else (4500 if rtt_ms <= 0 else 900)
            out.update(await one_query(target, rounds))
            out["ratios"] = one_query_ratios(out)
            return out
        finally:
            await registry.close_all_pools()

    results = asyncio.run(main())
    # A loop of its own, and a pool made for its settings.
    windows = (2, 0.3) if quick else (15, 0.5)
    results["concurrent"] = asyncio.run(concurrent(target, *windows))
    return results


def main() -> None:
    cli = parser(__doc__ or "")
    cli.set_defaults(transport=["plain", "tls"])
    args = cli.parse_args()
    results: dict[str, Any] = {"query": QUERY, "networks": {}}
    with bolt_target() as server:
        no_io_done = False
        for rtt, tls in networks(args):
            with network(server, rtt, tls) as target:
                with_no_io = rtt <= 0 and not no_io_done  # once: it does no I/O
                results["networks"][network_label(rtt, tls)] = measure(
                    target, rtt, args.quick, with_no_io
                )
                no_io_done = no_io_done or with_no_io
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
        for experiment, title in EXPERIMENTS.items():
            table(
                f"one query per task, {label}: {title} (ms, interleaved side by side)",
                ["variant", "tasks", "mean", "p50", "p95", "p99"],
                [
                    [name, f["tasks"], f["mean_ms"], f["p50_ms"], f["p95_ms"], f["p99_ms"]]
                    for name, f in figures[experiment].items()
                ],
            )
        if "concurrent" in figures:
            table(
                f"concurrent borrowers on one loop, {label}: neopool against the raw "
                f"shared driver (medians of rounds; the differences paired by round)",
                [
                    "borrowers",
                    "raw tasks/s",
                    "neopool tasks/s",
                    "neopool vs raw",
                    "raw CPU µs/task",
                    "neopool CPU µs/task",
                    "neopool CPU vs raw",
                ],
                [
                    [
                        c["borrowers"],
                        c["tasks_per_s"][RAW],
                        c["tasks_per_s"][POOLED],
                        f"{c['pooled_over_raw_pct']:+.2f}%",
                        c["cpu_us_per_task"][RAW],
                        c["cpu_us_per_task"][POOLED],
                        f"{c['pooled_cpu_over_raw_pct']:+.2f}%",
                    ]
                    for c in figures["concurrent"]["cells"]
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
                [
                    "neopool over raw shared driver, paired (µs, % of p50)",
                    f"{ratios['pool_overhead_vs_raw_us_paired']} "
                    f"({ratios['pool_overhead_vs_raw_pct_paired']}%)",
                ],
                [
                    "neopool over Semaphore + shared driver, paired (µs, % of p50)",
                    f"{ratios['pooled_vs_semaphore_us_paired']} "
                    f"({ratios['pooled_vs_semaphore_pct_paired']}%)",
                ],
            ],
        )


if __name__ == "__main__":
    main()
