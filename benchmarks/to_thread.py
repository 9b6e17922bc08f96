"""Against ApeRAG's final design: one sync driver per process, ``asyncio.to_thread`` per query.

ApeRAG, where the design note came from, finally shipped a worker-wide sync
``neo4j.Driver`` (``max_connection_pool_size=50``), and runs every storage call
as ``asyncio.to_thread`` of a function that opens a session on it, runs the
query and closes the session. Here both designs serve N concurrent borrowers on
one event loop, for N in 1, 10 and 50, each borrower doing one query after
another for a fixed time:

- neopool: ``async with borrow_connection()``, one query on the loop's
  ``AsyncDriver``, return;
- the raw shared ``AsyncDriver`` with no pool around it: the limit of the async design;
- sync driver + ``asyncio.to_thread``: the same query on the shared sync driver,
  in the loop's default executor (``min(32, CPUs + 4)`` threads, as ApeRAG runs it);
- where N is above that bound, the same with an executor of N threads: what
  raising the bound buys.

Both get ApeRAG's settings: 50 sockets at most, and neopool lends up to 50
leases. Each round runs every variant in a new random order; a variant's
figure is the median of its rounds, and a ratio is the median of the ratios
within each round (paired, so a slow round slows every variant alike).
"CPU µs/task" is this process's CPU time (all its threads; not the server's,
nor the proxy's) per completed task.
On loopback and through the latency proxy (``--rtt-ms``; ``--transport tls`` too).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from neo4j import GraphDatabase

from common import Target, bolt_target, network, network_label, networks, parser, save, table
from micro import POOLED, RAW, run_query
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory
from neopool.demo.report import summarise_ms
from neopool.loop_pool import create_driver

QUERY = "RETURN 1 AS x"
BORROWERS = (1, 10, 50)
#: ApeRAG's max_connection_pool_size; neopool's pool_max_size matches it.
SOCKETS = 50
#: How many threads asyncio.to_thread has at most here (the default executor's bound).
DEFAULT_THREADS = min(32, (os.cpu_count() or 1) + 4)
TO_THREAD = "sync driver + asyncio.to_thread"
SIZED = "sync driver + to_thread, a thread per borrower"
#: The share of each timed window before calls are counted: every borrower is under way then.
SETTLE = 0.2
#: The baselines, and the key of neopool's ratio over each in the results.
BASELINES = {TO_THREAD: "neopool_over_to_thread", SIZED: "neopool_over_sized"}


async def timed(
    call: Callable[[], Awaitable[None]], borrowers: int, seconds: float
) -> tuple[list[float], int]:
    """``borrowers`` coroutines calling ``call`` one call after another for ``seconds``.

    Returns the latency (ms) of every call that ended in the measured span (the
    last ``1 - SETTLE`` of the time, once every borrower is under way, so a
    window's start, with nothing yet in flight, does not count against the slower
    variant), and how many calls there were in all. Calls still running at the
    end are waited for, so nothing overlaps the next measurement.
    """
    begin = time.perf_counter()
    measured_from = begin + seconds * SETTLE
    deadline = begin + seconds
    latencies: list[float] = []
    calls = 0

    async def borrower() -> None:
        nonlocal calls
        while (started := time.perf_counter()) < deadline:
            await call()
            calls += 1
            ended = time.perf_counter()
            if measured_from <= ended <= deadline:
                latencies.append((ended - started) * 1000.0)

    await asyncio.gather(*(borrower() for _ in range(borrowers)))
    return latencies, calls


async def alternating(
    variants: dict[str, Callable[[], Awaitable[None]]],
    borrowers: int,
    rounds: int,
    seconds: float,
) -> dict[str, Any]:
    """Each variant for ``seconds`` per round, in a new random order each round."""
    names = list(variants)
    for name in names:  # warm-up: sockets open, threads started, code paths hot
        await timed(variants[name], borrowers, seconds / 3)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    cpu_us: dict[str, list[float]] = {name: [] for name in names}
    latencies: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(borrowers)
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            cpu = time.process_time()  # every thread of this process: the loop's and the pool's
            done, calls = await timed(variants[name], borrowers, seconds)
            cpu = time.process_time() - cpu
            per_round[name].append(len(done) / (seconds * (1 - SETTLE)))
            cpu_us[name].append(cpu / max(calls, 1) * 1e6)
            latencies[name].extend(done)
    figures = {
        name: {
            "tasks_per_s": round(statistics.median(per_round[name]), 1),
            "tasks_per_s_by_round": [round(x, 1) for x in per_round[name]],
            "cpu_us_per_task": round(statistics.median(cpu_us[name]), 1),
            **summarise_ms(latencies[name]),
        }
        for name in names
    }
    ratios = {
        key: round(
            statistics.median(
                p / b for p, b in zip(per_round[POOLED], per_round[name], strict=True) if b
            ),
            2,
        )
        for name, key in BASELINES.items()
        if name in per_round
    }
    return {"borrowers": borrowers, "variants": figures, "ratios": ratios}


async def on_executor(executor: ThreadPoolExecutor, function: Callable[[], None]) -> None:
    """``asyncio.to_thread`` on a given executor (the context goes along, as there)."""
    context = contextvars.copy_context()
    await asyncio.get_running_loop().run_in_executor(
        executor, functools.partial(context.run, function)
    )


async def compare(target: Target, rounds: int, seconds: float) -> list[dict[str, Any]]:
    config = target.config(max_connection_pool_size=SOCKETS, pool_max_size=SOCKETS)
    GlobalNeo4jConnectionPool.set_config(config)
    db = target.database
    # the same settings neopool gives its async drivers
    sync_driver = GraphDatabase.driver(config.uri, auth=config.auth(), **config.driver_options())
    sync_driver.verify_connectivity()

    def sync_query() -> None:
        with sync_driver.session(database=db) as session:
            session.run(QUERY).consume()

    async def pooled() -> None:
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            await run_query(await borrowed.get_driver(), db)

    shared = create_driver(config)

    async def raw() -> None:
        await run_query(shared, db)

    async def to_thread() -> None:
        await asyncio.to_thread(sync_query)

    cells = []
    try:
        # The server's JIT first: the cells run from few borrowers to many, so a
        # server still warming up would favour whatever runs later.
        for call in (pooled, to_thread):
            await timed(call, max(BORROWERS), seconds * 2)
        for borrowers in BORROWERS:
            variants: dict[str, Callable[[], Awaitable[None]]] = {
                RAW: raw,
                POOLED: pooled,
                TO_THREAD: to_thread,
            }
            with contextlib.ExitStack() as stack:
                if borrowers > DEFAULT_THREADS:
                    executor = stack.enter_context(
                        ThreadPoolExecutor(borrowers, thread_name_prefix="to-thread-sized")
                    )
                    variants[SIZED] = functools.partial(on_executor, executor, sync_query)
                cells.append(await alternating(variants, borrowers, rounds, seconds))
            print(f"  {borrowers} borrowers done", flush=True)
    finally:
        await GlobalNeo4jConnectionPool().close_all_pools()
        await shared.close()
        sync_driver.close()
    return cells


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    rounds, seconds = (2, 0.25) if args.quick else (9, 0.5)
    results: dict[str, Any] = {
        "query": QUERY,
        "settings": {
            "borrowers": list(BORROWERS),
            "max_connection_pool_size": SOCKETS,
            "pool_max_size": SOCKETS,
            "default_executor_threads": DEFAULT_THREADS,
            "rounds": rounds,
            "seconds_per_variant_per_round": seconds,
        },
        "networks": {},
    }
    with bolt_target() as server:
        for rtt, tls in networks(args):
            label = network_label(rtt, tls)
            with network(server, rtt, tls) as target:
                print(f"{label}:", flush=True)
                cells = asyncio.run(compare(target, rounds, seconds))
            results["networks"][label] = {"cells": cells}
    report(results)
    save("to_thread", results, args.json)


def report(results: dict[str, Any]) -> None:
    for label, figures in results["networks"].items():
        rows = []
        for cell in figures["cells"]:
            for name, f in cell["variants"].items():
                ratio = f"{cell['ratios'][BASELINES[name]]}x" if name in BASELINES else ""
                rows.append(
                    [
                        cell["borrowers"],
                        name,
                        f["tasks_per_s"],
                        f["p50_ms"],
                        f["p99_ms"],
                        f["cpu_us_per_task"],
                        ratio,
                    ]
                )
        table(
            f"one query per task, {label}: neopool vs a sync driver + asyncio.to_thread "
            f"({results['settings']['default_executor_threads']} default threads)",
            [
                "borrowers",
                "variant",
                "tasks/s",
                "p50 ms",
                "p99 ms",
                "CPU µs/task",
                "neopool / this",
            ],
            rows,
        )


if __name__ == "__main__":
    main()
