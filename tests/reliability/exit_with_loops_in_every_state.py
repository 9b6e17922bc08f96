"""A program that leaves neopool loops in every state and simply returns from main.

Run as ``python exit_with_loops_in_every_state.py asyncio|uvloop`` with ``NEO4J_URI``,
``NEO4J_USERNAME`` and ``NEO4J_PASSWORD`` in the environment. Before returning it
prints one JSON line: what each loop's query returned and ``time.monotonic()`` at
the moment main returned (the clock is system-wide, so the caller measures how
long the interpreter took to exit from there).

The loops it leaves behind:

* ``ended_worker``: a non-daemon thread that ran ``neopool.run`` and ended;
* ``live_worker``: a non-daemon thread that ran ``neopool.run`` and is still alive,
  idle, when main returns (it ends once the main thread has ended);
* ``main``: the main thread's persistent loop (``neopool.run``);
* ``daemon_forever``: a loop running forever in a daemon thread, holding a lease;
* ``closed_without_teardown``: ``run_until_complete`` then ``loop.close()``;
* ``thread_never_closed``: ``new_event_loop`` + ``run_until_complete`` in a thread
  that ended without closing its loop.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import warnings
from typing import Any


def main(kind: str) -> None:
    if kind == "uvloop":
        import uvloop

        with warnings.catch_warnings():  # 3.12+ deprecates install(); it still works
            warnings.simplefilter("ignore", DeprecationWarning)
            uvloop.install()

    import neopool
    from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionConfig, Neo4jConnectionFactory

    GlobalNeo4jConnectionPool.set_config(
        Neo4jConnectionConfig(pool_min_size=2, close_timeout=2.0)  # the rest from NEO4J_*
    )

    async def one_query() -> int:
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            driver = await borrowed.get_driver()
            records, _, _ = await driver.execute_query("RETURN 1 AS one", database_="neo4j")
            return int(records[0]["one"])

    results: dict[str, Any] = {}

    def in_thread(name: str, target: Any, *, daemon: bool = False) -> threading.Thread:
        def record() -> None:
            results[name] = target()

        thread = threading.Thread(target=record, name=name, daemon=daemon)
        thread.start()
        return thread

    # A non-daemon thread with a persistent loop, ended before main returns.
    in_thread("ended_worker", lambda: neopool.run(one_query())).join()

    # A non-daemon thread with a persistent loop, idle and alive when main returns.
    live_ready = threading.Event()

    def live_worker() -> None:
        results["live_worker"] = neopool.run(one_query())
        live_ready.set()
        threading.main_thread().join()  # idle until the interpreter starts shutting down

    threading.Thread(target=live_worker, name="live_worker").start()

    # The main thread's persistent loop.
    results["main"] = neopool.run(one_query())

    # A loop running forever in a daemon thread, holding a lease.
    holding = threading.Event()

    async def hold_a_lease() -> None:
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            driver = await borrowed.get_driver()
            records, _, _ = await driver.execute_query("RETURN 1 AS one", database_="neo4j")
            results["daemon_forever"] = int(records[0]["one"])
            holding.set()
            await asyncio.Event().wait()  # forever

    def daemon_forever() -> None:
        loop = asyncio.new_event_loop()
        task = loop.create_task(hold_a_lease())  # referenced, as asyncio's docs ask
        loop.run_forever()
        task.cancel()  # never reached: the loop runs until the process ends

    threading.Thread(target=daemon_forever, name="daemon_forever", daemon=True).start()

    # A loop closed without teardown.
    loop = asyncio.new_event_loop()
    results["closed_without_teardown"] = loop.run_until_complete(one_query())
    loop.close()

    # A loop never closed, in a thread that ended.
    def never_closed() -> int:
        return asyncio.new_event_loop().run_until_complete(one_query())

    in_thread("thread_never_closed", never_closed).join()

    if not (live_ready.wait(60) and holding.wait(60)):
        raise RuntimeError("a thread did not reach its state in time")
    results["loop_type"] = type(neopool.runner.thread_loop()).__module__
    results["main_returned_at"] = time.monotonic()
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
