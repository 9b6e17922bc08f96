"""Borrowers that keep one loop's pool busy, for utilisation tests and measurements.

Each of ``workers`` borrowers borrows through neopool, runs ``RETURN 1`` and
returns the lease, again and again without a pause, so the pool stays near
``workers / pool_max_size`` utilisation: each return dips for a moment, and
the next borrow crosses back. Used by ``benchmarks/warnings_rate.py`` and the
warning tests, so the test checks the load the benchmark measures:

>>> borrows, utilisation = await keep_busy(workers=9, seconds=2.0)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import time

from neopool.factory import Neo4jConnectionFactory
from neopool.registry import GlobalNeo4jConnectionPool


async def keep_busy(workers: int, seconds: float, database: str = "neo4j") -> tuple[int, float]:
    """``workers`` borrowers flat out for ``seconds``: the pool's borrows, mean sampled utilisation.

    Runs on the running loop's pool of the global registry (configure it first);
    utilisation (``in_use / max_size``) is sampled every 10 ms.
    """
    pool = await GlobalNeo4jConnectionPool().get_pool()
    stop = time.monotonic() + seconds

    async def borrower() -> None:
        while time.monotonic() < stop:
            async with Neo4jConnectionFactory.borrow_connection() as borrowed:
                driver = await borrowed.get_driver()
                await driver.execute_query("RETURN 1", database_=database)

    samples: list[float] = []

    async def sampler() -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(0.01)
            samples.append(pool.in_use / pool.max_size)

    await asyncio.gather(*(borrower() for _ in range(workers)), sampler())
    return pool.stats()["borrows"], sum(samples) / len(samples)
