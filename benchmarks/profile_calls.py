"""Where a task's microseconds go: cProfile of one row of ``sync_caller.py`` or of a borrow.

``profile_calls.py VARIANT [--tasks N] [--sort tottime] [--top 25] [--plain]``

VARIANT is one of:

- ``ideal``: ``loop.run_until_complete`` of one query on a shared driver;
- ``runner``: ``neopool.run`` of one query on a driver made on the runner's loop;
- ``user``: ``neopool.run`` + ``borrow_connection`` + ``get_driver`` + session;
- ``task``: ``AsyncTask`` with a worker's request, borrowing as ``user`` does, as
  under the threads pool (it watches for a revocation);
- ``prefork-task``: the same as in a prefork child (nothing to watch);
- ``empty``: ``neopool.run`` of a coroutine that returns at once;
- ``process``: ``user`` on the process loop;
- ``borrow``: ``async with borrow_connection()`` + ``get_driver`` on a warm pool, no I/O.

``--plain`` runs the tasks without cProfile, for a sampling profiler outside
(``py-spy record --rate 2000 -o out.txt --format raw -- python profile_calls.py user --plain``),
which does not slow the Python code it watches as cProfile does.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from collections.abc import Callable
from typing import Any

import neopool
from common import bolt_target
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory, runner
from neopool.celery.task import worker_pool
from sync_caller import celery_task, open_driver, pooled_query, returns_at_once, run_query

VARIANTS = ("ideal", "runner", "user", "task", "prefork-task", "empty", "process", "borrow")


def calls(variant: str, target: Any, database: str) -> tuple[Callable[[], Any], Callable[[], None]]:
    """The call to repeat for ``variant``, and what to do once done."""
    GlobalNeo4jConnectionPool.set_config(target.config())
    if variant == "ideal":
        loop = asyncio.new_event_loop()
        driver = loop.run_until_complete(open_driver(target))

        def end_ideal() -> None:
            loop.run_until_complete(driver.close())
            loop.close()

        return (lambda: loop.run_until_complete(run_query(driver, database))), end_ideal
    if variant == "borrow":

        async def pairs(n: int) -> None:
            async with Neo4jConnectionFactory.borrow_connection() as borrowed:
                await borrowed.get_driver()  # the driver is open
            for _ in range(n):
                async with Neo4jConnectionFactory.borrow_connection() as borrowed:
                    await borrowed.get_driver()

        return (lambda: neopool.run(pairs(1000))), runner.close_all_loops
    if variant == "runner":
        driver = neopool.run(open_driver(target))

        def end_runner() -> None:
            neopool.run(driver.close())
            runner.close_all_loops()

        return (lambda: neopool.run(run_query(driver, database))), end_runner
    if variant in ("task", "prefork-task"):
        worker_pool("prefork" if variant == "prefork-task" else "threads")
        return celery_task(database), runner.close_all_loops
    if variant == "empty":
        return (lambda: neopool.run(returns_at_once())), runner.close_all_loops
    if variant == "process":
        runner.use_process_loop(True)
    return (lambda: neopool.run(pooled_query(database))), runner.close_all_loops


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__)
    cli.add_argument("variant", choices=VARIANTS)
    cli.add_argument("--tasks", type=int, default=3000)
    cli.add_argument("--sort", default="tottime")
    cli.add_argument("--top", type=int, default=25)
    cli.add_argument("--plain", action="store_true", help="no cProfile (for py-spy)")
    cli.add_argument(
        "--ours",
        action="store_true",
        help="neopool's own functions only, with how many of its calls a task makes",
    )
    args = cli.parse_args()
    tasks = args.tasks if args.variant != "borrow" else max(1, args.tasks // 1000)
    with bolt_target() as target:
        call, end = calls(args.variant, target, target.database)
        try:
            for _ in range(min(300, tasks)):  # warm-up
                call()
            started = time.perf_counter()
            if args.plain:
                for _ in range(tasks):
                    call()
            else:
                profile = cProfile.Profile()
                profile.enable()
                for _ in range(tasks):
                    call()
                profile.disable()
            elapsed = time.perf_counter() - started
        finally:
            end()
    per = 1000 if args.variant == "borrow" else 1
    print(f"{args.variant}: {elapsed / tasks / per * 1e6:.1f} µs per task", file=sys.stderr)
    if not args.plain:
        stats = pstats.Stats(profile, stream=sys.stdout)
        if args.ours:
            ours = [
                (calls, name)
                for (path, _, name), (calls, *_) in stats.stats.items()  # type: ignore[attr-defined]
                if "/neopool/" in path
            ]
            print(f"neopool's function calls per task: {sum(c for c, _ in ours) / tasks:.1f}")
            print(
                "  " + ", ".join(f"{name} {c / tasks:g}" for c, name in sorted(ours, reverse=True))
            )
            return
        stats.sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
