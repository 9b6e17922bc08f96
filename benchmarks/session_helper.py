"""What the one-call session costs over borrowing by hand, side by side.

Two ways to run one query on the running loop's pool:

- one call: ``async with Neo4jConnectionFactory.session(database=...) as session``;
- by hand: ``async with Neo4jConnectionFactory.borrow_connection() as borrowed``,
  ``await borrowed.get_driver()``, ``async with driver.session(database=...)``.

Measured twice: with one query (``RETURN 1``) in the session, and with no I/O
(the session opened and closed without a query: the helper's own cost, in µs).
Blocks of calls alternate round by round in a new random order, so drift and
noise hit both alike; the figure is the median over rounds of the ratio of the
two blocks of one round (1.0 is no cost), and the median paired difference.
"""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from common import Target, bolt_target, network, network_label, networks, parser, save, table
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory

QUERY = "RETURN 1 AS x"
ONE_CALL = "Neo4jConnectionFactory.session()"
BY_HAND = "borrow_connection + get_driver + driver.session"


def variants(database: str, query: bool) -> dict[str, Callable[[], Awaitable[None]]]:
    """The two ways, with a query in the session or none."""

    async def one_call() -> None:
        async with Neo4jConnectionFactory.session(database=database) as session:
            if query:
                await (await session.run(QUERY)).consume()

    async def by_hand() -> None:
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            driver = await borrowed.get_driver()
            async with driver.session(database=database) as session:
                if query:
                    await (await session.run(QUERY)).consume()

    return {ONE_CALL: one_call, BY_HAND: by_hand}


async def side_by_side(
    ways: dict[str, Callable[[], Awaitable[None]]], rounds: int, block: int
) -> dict[str, Any]:
    """µs per call of each way, per round (a block of ``block`` calls in a row each)."""
    names = list(ways)
    per_call: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: sockets open, code paths hot
        for _ in range(block):
            await ways[name]()
    gc.collect()
    order = random.Random(0)
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            run = ways[name]
            started = time.perf_counter()
            for _ in range(block):
                await run()
            per_call[name].append((time.perf_counter() - started) / block * 1e6)
    ratios = [a / b for a, b in zip(per_call[ONE_CALL], per_call[BY_HAND], strict=True)]
    differences = [a - b for a, b in zip(per_call[ONE_CALL], per_call[BY_HAND], strict=True)]
    return {
        "rounds": rounds,
        "block": block,
        "us_per_call_median": {n: round(statistics.median(v), 2) for n, v in per_call.items()},
        "median_ratio": round(statistics.median(ratios), 4),
        "ratio_p25_p75": [
            round(q, 4) for q in statistics.quantiles(ratios, n=4, method="inclusive")[::2]
        ],
        "median_difference_us": round(statistics.median(differences), 2),
    }


def measure(target: Target, quick: bool) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        registry = GlobalNeo4jConnectionPool()
        registry.set_config(target.config())
        try:
            return {
                "no_io": await side_by_side(
                    variants(target.database, query=False),
                    rounds=20 if quick else 200,
                    block=200,
                ),
                "one_query": await side_by_side(
                    variants(target.database, query=True),
                    rounds=20 if quick else 1000,
                    block=10,
                ),
            }
        finally:
            await registry.close_all_pools()

    return asyncio.run(main())


def main() -> None:
    cli = parser(__doc__ or "")
    cli.set_defaults(rtt_ms=[0.0])
    args = cli.parse_args()
    results: dict[str, Any] = {"query": QUERY, "networks": {}}
    with bolt_target() as server:
        for rtt, tls in networks(args):
            with network(server, rtt, tls) as target:
                results["networks"][network_label(rtt, tls)] = measure(target, args.quick)
    report(results)
    save("session_helper", results, args.json)


def report(results: dict[str, Any]) -> None:
    for label, figures in results["networks"].items():
        rows = []
        for experiment, title in (("no_io", "no I/O"), ("one_query", "one query")):
            f = figures[experiment]
            rows.append(
                [
                    title,
                    f["us_per_call_median"][ONE_CALL],
                    f["us_per_call_median"][BY_HAND],
                    f"{f['median_ratio']} ({f['ratio_p25_p75'][0]}-{f['ratio_p25_p75'][1]})",
                    f["median_difference_us"],
                ]
            )
        table(
            f"the one-call session against borrowing by hand, {label} "
            f"(µs per call, blocks interleaved side by side)",
            [
                "in the session",
                "one call (median)",
                "by hand (median)",
                "ratio: median (p25-p75)",
                "difference (µs)",
            ],
            rows,
        )


if __name__ == "__main__":
    main()
