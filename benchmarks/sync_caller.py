"""The sync-caller path: what a Celery task body pays per task to run a coroutine.

A sync caller (a Celery task body: no loop running in its thread) runs a
one-query coroutine again and again. Rows, per task:

- the ideal by hand: one long-lived loop in the thread, one shared driver made
  on it, ``loop.run_until_complete`` of the query;
- ``neopool.run`` of the same query on the same driver: the runner alone;
- ``neopool.run`` + ``borrow_connection`` + ``get_driver`` + session: what users write;
- the ideal as a plain Celery task (a sync body calling
  ``loop.run_until_complete``), called as the worker calls it, with a request
  id: what a hand-written task pays Celery itself;
- ``AsyncTask`` (a Celery task whose body is that coroutine, called the same
  way): under the threads pool, where it watches for a revocation, and under
  prefork, where it has nothing to watch; then both again with a soft time limit
  (as an app-wide ``task_soft_time_limit`` gives every task), which AsyncTask
  keeps itself under threads; compared with the plain Celery task;
- the ideal again, on a loop and a driver of its own: the control. Two drivers
  hold two server connections, and a connection's speed differs from another's
  by a few percent for reasons of the server's (its threads, its JIT): this
  row shows that spread, which the other rows avoid by sharing one;
- ``loop.run_until_complete`` and ``neopool.run`` of a coroutine that returns at
  once: the fixed cost of a call;
- the same ``neopool.run`` rows in process-loop mode (the call is handed to the
  loop's own thread and waited for).

The ideal, the runner and the users' rows run on one loop (the calling
thread's runner loop) and one driver (its pool's), so one connection serves
them all and what differs between them is only neopool's own work. The ideal
runs with the loop's task factory taken off, as a loop made by hand has none.

The rows take turns task by task: each step runs one task of every row, in
a new random order, so drift, the server's pauses and the caches' state
hit every row alike (measured in blocks of one row at a time instead, two
rows differed by up to 6% from one run to the next, because the order of
the blocks was different). A row's figure is the median of its tasks' µs;
its overhead is the median of its differences from its baseline's task of
the same step, in µs and as a share of the baseline's median. The same for
this process's CPU time (the server is a process of its own). Objects made
before the timing are frozen out of the garbage collector's way
(``gc.freeze``). The immediate-coroutine rows are compared with
``loop.run_until_complete`` of the same. The caller is the main thread, as in
a prefork or solo worker.
"""

from __future__ import annotations

import asyncio
import gc
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
from neopool.celery.task import worker_pool
from neopool.loop_pool import create_driver

QUERY = "RETURN 1 AS x"
#: The soft time limit of the rows that have one (seconds; never reached here).
SOFT_TIME_LIMIT = 600.0
#: Steps per round (each step runs one task of every row).
BLOCK = 150

IDEAL = "ideal: loop.run_until_complete, shared driver"
RUNNER = "neopool.run, same driver (the runner alone)"
USER = "neopool.run + borrow_connection + get_driver + session"
CELERY_IDEAL = "the ideal as a plain Celery task (worker request)"
TASK = "AsyncTask, threads pool (revocation watched) + borrow + session"
PREFORK_TASK = "AsyncTask, prefork child + borrow + session"
TASK_SOFT = "AsyncTask, threads pool, soft time limit + borrow + session"
PREFORK_TASK_SOFT = "AsyncTask, prefork child, soft time limit + borrow + session"
CONTROL = "control: the ideal on a loop and driver of its own"
RUC_EMPTY = "loop.run_until_complete(returns at once)"
RUN_EMPTY = "neopool.run(returns at once)"
PROCESS_USER = "process loop: neopool.run + borrow + session"
PROCESS_EMPTY = "process loop: neopool.run(returns at once)"
#: What each row is compared with.
BASELINE = {
    IDEAL: IDEAL,
    RUNNER: IDEAL,
    USER: IDEAL,
    CELERY_IDEAL: IDEAL,
    TASK: CELERY_IDEAL,
    PREFORK_TASK: CELERY_IDEAL,
    TASK_SOFT: CELERY_IDEAL,
    PREFORK_TASK_SOFT: CELERY_IDEAL,
    CONTROL: IDEAL,
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


def celery_task(database: str, soft_time_limit: float | None = None) -> Callable[[], Any]:
    """An AsyncTask called the way a worker calls it: its request carries an id."""
    app = Celery("sync_caller", set_as_current=False)
    _install_stack_protection()  # what the worker does: the request stack is the tracer's
    name = "sync_caller.query" if soft_time_limit is None else "sync_caller.query_soft"

    @app.task(base=AsyncTask, name=name, soft_time_limit=soft_time_limit)  # type: ignore[untyped-decorator]
    async def query() -> None:
        await pooled_query(database)

    query.push_request(id="sync-caller-benchmark", called_directly=False)
    return query  # type: ignore[no-any-return]


def celery_task_by_hand(body: Callable[[], Any]) -> Callable[[], Any]:
    """A plain (sync) Celery task running ``body``, called as :func:`celery_task` is: what
    a hand-written task pays to Celery itself."""
    app = Celery("sync_caller_by_hand", set_as_current=False)

    @app.task(name="sync_caller.by_hand")  # type: ignore[untyped-decorator]
    def by_hand() -> None:
        body()

    by_hand.push_request(id="sync-caller-benchmark", called_directly=False)
    return by_hand  # type: ignore[no-any-return]


def paired_overhead(prefix: str, row: list[float], base: list[float]) -> dict[str, float]:
    """The median of the row's differences from its baseline, task by task (each pair
    ran side by side, in one round), in µs and as a share of the baseline's median."""
    difference = statistics.median(r - b for r, b in zip(row, base, strict=True))
    return {
        f"{prefix}overhead_us": round(difference, 1),
        f"{prefix}overhead_pct": round(100 * difference / statistics.median(base), 1),
    }


async def pool_driver() -> AsyncDriver:
    """The driver of this loop's pool: the one ``pooled_query`` borrows."""
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        return await borrowed.get_driver()


def measure(target: Target, rounds: int) -> dict[str, Any]:
    db = target.database
    GlobalNeo4jConnectionPool.set_config(target.config())
    shared = neopool.run(pool_driver())
    loop = runner.thread_loop()  # the loop neopool.run uses in this thread
    own_loop = asyncio.new_event_loop()
    own_driver = own_loop.run_until_complete(open_driver(target))
    task = celery_task(db)
    task_soft = celery_task(db, soft_time_limit=SOFT_TIME_LIMIT)

    def by_hand(coro_fn: Callable[[], Any]) -> Callable[[], Any]:
        """``loop.run_until_complete`` on the runner's loop, as on a loop made by hand."""
        return lambda: loop.run_until_complete(coro_fn())

    variants: dict[str, Callable[[], Any]] = {
        IDEAL: by_hand(lambda: run_query(shared, db)),
        RUNNER: lambda: neopool.run(run_query(shared, db)),
        USER: lambda: neopool.run(pooled_query(db)),
        CELERY_IDEAL: celery_task_by_hand(by_hand(lambda: run_query(shared, db))),
        TASK: task,
        PREFORK_TASK: task,
        TASK_SOFT: task_soft,
        PREFORK_TASK_SOFT: task_soft,
        CONTROL: lambda: own_loop.run_until_complete(run_query(own_driver, db)),
        RUC_EMPTY: by_hand(returns_at_once),
        RUN_EMPTY: lambda: neopool.run(returns_at_once()),
        PROCESS_USER: lambda: neopool.run(pooled_query(db)),
        PROCESS_EMPTY: lambda: neopool.run(returns_at_once()),
    }
    #: Rows run as by hand: without the runner's task factory on the loop.
    plain = {IDEAL, CELERY_IDEAL, RUC_EMPTY}

    def one_task(name: str) -> tuple[float, float]:
        """One call of ``name``: µs of wall time, and of this process's CPU time (every
        thread of it; the server is a process of its own)."""
        call = variants[name]
        runner.use_process_loop(name in PROCESS_ROWS)
        factory = loop.get_task_factory()
        if name in plain:
            loop.set_task_factory(None)
        worker_pool("prefork" if name in (PREFORK_TASK, PREFORK_TASK_SOFT) else "threads")
        try:
            cpu, started = time.process_time(), time.perf_counter()
            call()
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            return wall * 1e6, cpu * 1e6
        finally:
            loop.set_task_factory(factory)
            worker_pool("threads")
            runner.use_process_loop(False)

    names = list(variants)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    try:
        for _ in range(BLOCK):  # warm-up: sockets open, pools made, code paths hot
            for name in names:
                one_task(name)
        # What exists now (the benchmark's imports: Celery, the driver...) is kept out of
        # the collector's way, so a full collection costs what the tasks' own garbage does.
        gc.collect()
        gc.freeze()
        order = random.Random(0)
        for _ in range(rounds * BLOCK):
            for name in order.sample(names, len(names)):
                took, used = one_task(name)
                wall[name].append(took)
                cpu[name].append(used)
    finally:
        gc.unfreeze()
        own_loop.run_until_complete(own_driver.close())
        own_loop.close()
        runner.close_all_loops()
    rows = {}
    for name in names:
        base = BASELINE[name]
        rows[name] = {
            "us_per_task": round(statistics.median(wall[name]), 1),
            "baseline": base,
            **paired_overhead("", wall[name], wall[base]),
            "cpu_us_per_task": round(statistics.median(cpu[name]), 1),
            **paired_overhead("cpu_", cpu[name], cpu[base]),
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
        "settings": {"tasks_per_round": BLOCK, "rounds": rounds},
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
            f"a sync caller, one query per task, {label} ({settings['tasks_per_round']} tasks "
            f"per round, {settings['rounds']} rounds, task by task in a new random order; "
            f"median of the paired differences)",
            ["per task", "µs", "over its baseline", "CPU µs", "CPU over its baseline"],
            [
                [
                    name,
                    f["us_per_task"],
                    "baseline"
                    if f["baseline"] == name
                    else f"{f['overhead_pct']:+.1f}% ({f['overhead_us']:+.1f} µs)",
                    f["cpu_us_per_task"],
                    "baseline"
                    if f["baseline"] == name
                    else f"{f['cpu_overhead_pct']:+.1f}% ({f['cpu_overhead_us']:+.1f} µs)",
                ]
                for name, f in figures["rows"].items()
            ],
        )


if __name__ == "__main__":
    main()
