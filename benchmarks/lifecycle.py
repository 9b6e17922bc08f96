"""How things end, measured: the figures of the lifecycle contract.

* ``close_all_pools(timeout=5)`` with one idle persistent loop (another
  thread's ``neopool.run``), one busy loop (a call holding a lease while the
  close runs) and one loop closed without teardown: how long it takes, and
  the server connections left.
* 50 threads that each run ``new_event_loop()`` + ``run_until_complete()`` and
  end without ``loop.close()``: server connections and this process's file
  descriptors before and after.

Connections are counted by a TCP proxy in front of the server, which sees what
the server sees. Prints a table and writes ``results/lifecycle.json``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import neopool
from common import Target, bolt_target, parser, print_table, save
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory
from neopool.runner import close_all_loops
from neopool.testing import TcpProxy, reset_registry


async def one_query() -> None:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        await driver.execute_query("RETURN 1", database_="neo4j")


def open_fds() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


def settle(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def close_all_pools_with_idle_busy_and_closed_loops(proxy: TcpProxy) -> dict[str, Any]:
    idle_ready, busy_holding, release = threading.Event(), threading.Event(), threading.Event()

    def idle_thread() -> None:
        neopool.run(one_query())
        idle_ready.set()
        release.wait(60)

    async def hold() -> None:
        async with Neo4jConnectionFactory.borrow_connection():
            busy_holding.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 60)

    threads = [
        threading.Thread(target=idle_thread),
        threading.Thread(target=lambda: neopool.run(hold())),
    ]
    for thread in threads:
        thread.start()
    idle_ready.wait(60)
    busy_holding.wait(60)
    closed = asyncio.new_event_loop()
    closed.run_until_complete(one_query())
    closed.close()
    before = proxy.active_connections

    started = time.perf_counter()
    asyncio.run(GlobalNeo4jConnectionPool().close_all_pools(timeout=5))
    seconds = time.perf_counter() - started
    release.set()
    for thread in threads:
        thread.join(60)
    close_all_loops(10)
    settle(lambda: proxy.active_connections == 0)
    return {
        "seconds": round(seconds, 3),
        "connections_before": before,
        "connections_after": proxy.active_connections,
    }


def threads_that_never_close_their_loops(proxy: TcpProxy, count: int) -> dict[str, Any]:
    gc.collect()
    fds_before, connections_before = open_fds(), proxy.active_connections

    def celery_style() -> None:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(one_query())

    peak = 0
    for _ in range(count // 10):
        batch = [threading.Thread(target=celery_style) for _ in range(10)]
        for thread in batch:
            thread.start()
        for thread in batch:
            thread.join(60)
        peak = max(peak, proxy.active_connections)
    settle(lambda: proxy.active_connections == connections_before)
    gc.collect()
    settle(lambda: open_fds() <= fds_before)
    return {
        "threads": count,
        "peak_connections": peak,
        "connections_after": proxy.active_connections - connections_before,
        "fds_before": fds_before,
        "fds_after": open_fds(),
    }


def main() -> None:
    options = parser(__doc__).parse_args()
    del options
    with bolt_target() as target:
        address = urlsplit(target.uri)
        with TcpProxy(address.hostname or "127.0.0.1", address.port or 7687) as proxy:
            reset_registry()
            through = Target(proxy.uri(), target.username, target.password)
            GlobalNeo4jConnectionPool.set_config(through.config(pool_min_size=2, close_timeout=5))
            closing = close_all_pools_with_idle_busy_and_closed_loops(proxy)
            reset_registry()
            GlobalNeo4jConnectionPool.set_config(through.config(pool_min_size=2))
            threads = threads_that_never_close_their_loops(proxy, 50)
            reset_registry()
    print_table(
        "How things end",
        ["figure", "value"],
        [
            ["close_all_pools(timeout=5), idle + busy + closed loop: s", closing["seconds"]],
            [
                "  server connections before -> after",
                f"{closing['connections_before']} -> {closing['connections_after']}",
            ],
            ["50 threads never closing their loops: peak connections", threads["peak_connections"]],
            ["  server connections left", threads["connections_after"]],
            ["  descriptors before -> after", f"{threads['fds_before']} -> {threads['fds_after']}"],
        ],
    )
    save("lifecycle", {"close_all_pools": closing, "threads_never_closing": threads})


if __name__ == "__main__":
    main()
