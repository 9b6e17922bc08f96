"""Short I/O-bound Celery tasks: which worker mode, on the same cores.

The demo's task (borrow, prepare a workspace, MERGE 3 entities and 2
relations, return) on the neopool runner, sent to workers of every mode at
once:

* ``prefork -c 2``: two processes, one persistent loop each, one task at a time each;
* ``threads -c N``, a loop per thread: N loops, N pools, N drivers in one process;
* ``threads -c N``, process loop: N tasks in flight on one loop, one pool, one driver;
* ``--workers`` such workers on one queue (prefork's process count by default):
  as many processes as prefork's, each with one loop and one driver. The target
  over prefork is judged on this one, like for like; the one against a loop per
  thread (one process) on the single process-loop worker.

Modes take turns in rounds (order rotating) on real servers (embedded ArcadeDB,
Valkey), through the latency proxy at 2 ms RTT by default. Reports tasks/s, p50
and p99 task latency, Bolt sockets per worker process at rest and at peak,
drivers and errors; checks the issue's targets; writes results/celery_tasks.json.

    python benchmarks/celery_tasks.py [--tasks 1200] [--rounds 4] [--in-flight 16] [--rtt-ms 2]
"""

from __future__ import annotations

import os
from typing import Any

from common import network_label, parser, save, table
from neopool.demo.app import TASKS, WorkerKind
from worker_modes import (
    PER_THREAD,
    PREFORK,
    PROCESS,
    PROCESSES,
    add_worker_options,
    columns,
    compare,
    parse_worker_args,
    report,
    rows,
    shutdown_seconds,
    worker_modes,
)

RUNNER_TASK = TASKS["neopool + persistent runner"]


def targets(
    figures: dict[str, Any], pool_max: int, pool_min: int, processes: int
) -> list[list[Any]]:
    """``[target, measured, met]``: the issue's targets for short I/O-bound tasks.

    Each comparison is like for like, between as many worker processes: prefork
    ``-c 2`` against as many process-loop workers, a loop per thread (one
    process) against one process-loop worker.
    """

    def tps(mode: str) -> float:
        return float(figures[mode]["tasks_per_s"]) or float("nan")

    one_over_prefork = tps(PROCESS) / tps(PREFORK)
    vs_per_thread = 100 * (tps(PROCESS) / tps(PER_THREAD) - 1)
    at_rest = figures[PROCESS]["sockets_per_process_at_rest"]
    errors = sum(m["errors"] for m in figures.values())
    checked: list[list[Any]] = []
    if PROCESSES in figures:
        over_prefork = tps(PROCESSES) / tps(PREFORK)
        checked.append(
            [
                f"process loop, {processes} processes: >= 2x prefork -c {processes} tasks/s",
                f"{over_prefork:.2f}x",
                over_prefork >= 2,
            ]
        )
    return [
        *checked,
        ["process loop, one process, vs prefork", f"{one_over_prefork:.2f}x", None],
        [
            "process loop, one process: within 10% of a loop per thread",
            f"{vs_per_thread:+.1f}%",
            vs_per_thread >= -10,
        ],
        [
            f"process loop sockets at rest <= pool_max + pool_min ({pool_max + pool_min})",
            at_rest,
            at_rest <= pool_max + pool_min,
        ],
        ["process loop: one driver per process", figures[PROCESS]["drivers_created"], None],
        ["no errors", errors, errors == 0],
    ]


def main() -> None:
    cli = parser(__doc__ or "")
    cli.set_defaults(rtt_ms=[2.0])
    cli.add_argument("--tasks", type=int, default=None, help="tasks per mode (default 1200)")
    cli.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 4)")
    add_worker_options(cli, in_flight=16, per_thread=16)
    args = parse_worker_args(cli)
    tasks = args.tasks or (120 if args.quick else 1200)
    rounds = args.rounds or (2 if args.quick else 4)
    from neopool.config import Neo4jConnectionConfig

    defaults = Neo4jConnectionConfig.model_fields
    pool_max = int(defaults["pool_max_size"].default)
    pool_min = int(defaults["pool_min_size"].default)
    results: dict[str, Any] = {"networks": {}}
    for rtt in args.rtt_ms:
        label = network_label(rtt)
        measured = compare(
            worker_modes(RUNNER_TASK, args),
            tasks=tasks,
            rounds=rounds,
            rtt_ms=rtt,
            warmup=max(1, tasks // 10),
            name="celery_tasks",
        )
        checked = targets(measured["modes"], pool_max, pool_min, args.processes)
        results["networks"][label] = report(
            measured,
            checked,
            f"short I/O-bound Celery tasks, {label}: {tasks} tasks per mode in {rounds} "
            f"alternating rounds, all workers on the same {os.cpu_count()} cores",
            columns(),
            rows(measured["modes"]),
        )
    save("celery_tasks", results, args.json)
    # A warm shutdown with every thread busy: tasks that end in time, and tasks cut off.
    kind = WorkerKind("threads", args.in_flight, "process")
    shutdowns = [
        shutdown_seconds(kind, hold_s=hold, drain_s=drain, rtt_ms=args.rtt_ms[0])
        for hold, drain in ((2.0, 30.0), (60.0, 5.0))
    ]
    results["shutdown"] = shutdowns
    table(
        "warm shutdown (SIGTERM) with tasks in flight",
        ["worker", "in flight", "task s left", "drain_timeout s", "shutdown s", "finished", "exit"],
        [
            [s["worker"], s["tasks_in_flight"], s["task_seconds_left"], s["drain_timeout_s"],
             s["shutdown_s"], s["tasks_finished"], s["exit_code"]]
            for s in shutdowns
        ],
    )  # fmt: skip
    for s in shutdowns:
        print(s["neopool_says"])
    save("celery_tasks", results, args.json)


if __name__ == "__main__":
    main()
