"""The sync-caller path: what a Celery task body pays per task to run a coroutine.

A sync caller (a Celery task body: no loop running in its thread) runs a
one-query coroutine again and again. Rows, per task:

- the ideal by hand: one long-lived loop in the thread, one shared driver made
  on it, ``loop.run_until_complete`` of the query;
- ``neopool.run`` of the same query on a driver made on the runner's loop: the
  runner alone;
- ``neopool.run`` + ``borrow_connection`` + ``get_driver`` + session: what users write;
- ``AsyncTask`` (a Celery task whose body is that coroutine, called as the
  worker calls it, with a request id, so revocation is watched);
- ``loop.run_until_complete`` and ``neopool.run`` of a coroutine that returns at
  once: the fixed cost of a call;
- the same ``neopool.run`` rows in process-loop mode (the call is handed to the
  loop's own thread and waited for).

Each row runs ``BLOCK`` tasks in a row (a block); each round runs every row's
block once, in a new random order. A row's figure is the median of its
blocks' µs per task; its overhead is the median, over rounds, of its block
over the ideal's block of the same round (paired, so a slow round slows every
row alike). The immediate-coroutine rows are compared with
``loop.run_until_complete`` of the same. The caller is the main thread, as in
a prefork or solo worker.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from celery.app.trace import _install_stack_protection
from neo4j import AsyncDriver

import neopool
from celery import Celery
from common import Target, bolt_target, network, network_label, networks, parser, save, table
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory, runner
from neopool.celery import AsyncTask
from neopool.loop_pool import create_driver

QUERY = "RETURN 1 AS x"
#: Tasks in a row of one variant.
BLOCK = 150

IDEAL = "ideal: loop.run_until_complete, shared driver"
RUNNER = "neopool.run, driver on the runner's loop (runner alone)"
USER = "neopool.run + borrow_connection + get_driver + session"
TASK = "AsyncTask (worker request) + borrow + session"
RUC_EMPTY = "loop.run_until_complete(returns at once)"
RUN_EMPTY = "neopool.run(returns at once)"
PROCESS_USER = "process loop: neopool.run + borrow + session"
PROCESS_EMPTY = "process loop: neopool.run(returns at once)"
#: What each row is compared with.
BASELINE = {
    IDEAL: IDEAL,
    RUNNER: IDEAL,
    USER: IDEAL,
    TASK: IDEAL,
    PROCESS_USER: IDEAL,
    RUC_EMPTY: RUC_EMPTY,
    RUN_EMPTY: RUC_EMPTY,
    PROCESS_EMPTY: RUC_EMPTY,
}
#: Rows run in process-loop mode.
PROCESS_ROWS = (PROCESS_USER, PROCESS_EMPTY)


async def run_query(driver: AsyncDriver, database: str) -> None:
    async with driver.session(database=database) as session:
        await (await session.run(QUERY)).consume()


async def pooled_query(database: str) -> None:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        await run_query(await borrowed.get_driver(), database)


async def returns_at_once() -> None:
    return None


async def open_driver(target: Target) -> AsyncDriver:
    driver = create_driver(target.config())
    await driver.verify_connectivity()
    return driver


def celery_task(database: str) -> Callable[[], Any]:
    """An AsyncTask called the way a worker calls it: its request carries an id."""
    app = Celery("sync_caller", set_as_current=False)
    _install_stack_protection()  # what the worker does: the request stack is the tracer's

    @app.task(base=AsyncTask, name="sync_caller.query")  # type: ignore[untyped-decorator]
    async def query() -> None:
        await pooled_query(database)

    query.push_request(id="sync-caller-benchmark", called_directly=False)
    return query  # type: ignore[no-any-return]


def measure(target: Target, rounds: int) -> dict[str, Any]:
    db = target.database
    GlobalNeo4jConnectionPool.set_config(target.config())
    loop = asyncio.new_event_loop()
    ideal_driver = loop.run_until_complete(open_driver(target))
    runner_driver = neopool.run(open_driver(target))
    task = celery_task(db)

    variants: dict[str, Callable[[], Any]] = {
        IDEAL: lambda: loop.run_until_complete(run_query(ideal_driver, db)),
        RUNNER: lambda: neopool.run(run_query(runner_driver, db)),
        USER: lambda: neopool.run(pooled_query(db)),
        TASK: task,
        RUC_EMPTY: lambda: loop.run_until_complete(returns_at_once()),
        RUN_EMPTY: lambda: neopool.run(returns_at_once()),
        PROCESS_USER: lambda: neopool.run(pooled_query(db)),
        PROCESS_EMPTY: lambda: neopool.run(returns_at_once()),
    }

    def block(name: str, tasks: int) -> float:
        """µs per task of ``tasks`` calls of ``name`` in a row."""
        call = variants[name]
        runner.use_process_loop(name in PROCESS_ROWS)
        try:
            started = time.perf_counter()
            for _ in range(tasks):
                call()
            return (time.perf_counter() - started) / tasks * 1e6
        finally:
            runner.use_process_loop(False)

    try:
        names = list(variants)
        for name in names:  # warm-up: sockets open, pools made, code paths hot
            block(name, BLOCK)
        per_block: dict[str, list[float]] = {name: [] for name in names}
        order = random.Random(0)
        for _ in range(rounds):
            for name in order.sample(names, len(names)):
                per_block[name].append(block(name, BLOCK))
    finally:
        loop.run_until_complete(ideal_driver.close())
        loop.close()
        neopool.run(runner_driver.close())
        runner.close_all_loops()
    rows = {}
    for name, blocks in per_block.items():
        base = per_block[BASELINE[name]]
        ratio = statistics.median(b / i for b, i in zip(blocks, base, strict=True))
        rows[name] = {
            "us_per_task": round(statistics.median(blocks), 1),
            "us_per_task_min": round(min(blocks), 1),
            "baseline": BASELINE[name],
            "ratio_to_baseline": round(ratio, 3),
            "overhead_pct": round(100 * (ratio - 1), 1),
        }
    return {"rows": rows}


def main() -> None:
    cli = parser(__doc__ or "")
    cli.set_defaults(rtt_ms=[0.0])
    cli.add_argument("--rounds", type=int, default=None, help="rounds of blocks (default 40)")
    args = cli.parse_args()
    rounds = args.rounds or (4 if args.quick else 40)
    results: dict[str, Any] = {
        "query": QUERY,
        "settings": {"tasks_per_block": BLOCK, "rounds": rounds},
        "networks": {},
    }
    with bolt_target() as server:
        for rtt, tls in networks(args):
            label = network_label(rtt, tls)
            with network(server, rtt, tls) as target:
                results["networks"][label] = measure(target, rounds)
    report(results)
    save("sync_caller", results, args.json)


def report(results: dict[str, Any]) -> None:
    settings = results["settings"]
    for label, figures in results["networks"].items():
        table(
            f"a sync caller, one query per task, {label} ({settings['tasks_per_block']} tasks "
            f"per block, {settings['rounds']} rounds, median of paired block ratios)",
            ["per task", "µs", "over its baseline"],
            [
                [
                    name,
                    f["us_per_task"],
                    "baseline"
                    if f["baseline"] == name
                    else f"{f['overhead_pct']:+.1f}% ({f['ratio_to_baseline']:.2f}x)",
                ]
                for name, f in figures["rows"].items()
            ],
        )


if __name__ == "__main__":
    main()
