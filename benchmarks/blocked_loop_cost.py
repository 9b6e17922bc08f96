"""What the blocked-loop detector costs the process loop: on and off, side by side.

Threads submit calls to the process loop (``neopool.run``), as a
``--pool=threads`` worker in the process-loop mode does: each call borrows a
lease and runs ``RETURN 1`` on the server (the ``query`` workload), or only
yields to the loop a few times (``loop``: no I/O, so any cost of the detector's
heartbeat shows at its largest). One process loop, with its pool and driver,
serves every round; the detector is switched on (a watch with a threshold of
0.25 s, the default) and off between blocks, both in every round (ABBA order),
so the two modes share the loop, the driver and its sockets and differ only by
the detector. The table gives the median of the rounds, and the median of each
round's ratio on/off for throughput and for CPU time per call (pairing cancels
the machine's drift between rounds).
First it measures the floor: the CPU a process with an idle process loop
uses per second with the detector on and off (its heartbeat wakes the loop,
and its watchdog wakes, every 0.125 s).

    python benchmarks/blocked_loop_cost.py [--rounds 20] [--calls 100] [--threads 16]
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from typing import Any

import neopool
from common import bolt_target, parser, save, table
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory, blocked_loop, runner

ON, OFF = "detector on (0.25 s)", "detector off"
THRESHOLDS = {ON: 0.25, OFF: 0.0}


async def query() -> None:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        await driver.execute_query("RETURN 1")


async def loop_only() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


WORKLOADS = {"query": query, "loop": loop_only}


def one_round(workload: str, threads: int, calls: int, threshold: float) -> dict[str, float]:
    """``threads`` threads each making ``calls`` calls; throughput and CPU per call,
    with the detector watching the process loop at ``threshold`` (0: off)."""
    work = WORKLOADS[workload]
    loop = runner.process_loop()
    (thread,) = (t for t in threading.enumerate() if t.name == runner.PROCESS_LOOP_THREAD)
    watch = blocked_loop.watch(loop, thread, threshold) if threshold else None
    # The watchdog thread's own CPU time, read from its clock (ns, Linux): a direct count
    # of what the detector spends beside the loop (its heartbeat is a timer callback).
    watchdog = None if watch is None else watch._watchdog.ident
    clock = time.pthread_getcpuclockid(watchdog) if watchdog is not None else None
    try:
        spent = time.clock_gettime(clock) if clock is not None else 0.0
        figures = timed_calls(work, threads, calls)
        if clock is not None:
            spent = time.clock_gettime(clock) - spent
            figures["watchdog_cpu_share"] = spent / figures["cpu_s"]
        return figures
    finally:
        if watch is not None:
            watch.stop(timeout=5)


def timed_calls(work: Any, threads: int, calls: int) -> dict[str, float]:
    go = threading.Barrier(threads + 1)

    def caller() -> None:
        go.wait()
        for _ in range(calls):
            neopool.run(work())

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    for worker in workers:
        worker.start()
    go.wait()
    cpu, wall = time.process_time(), time.perf_counter()
    for worker in workers:
        worker.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    total = threads * calls
    return {"calls_per_s": total / wall, "cpu_us_per_call": cpu / total * 1e6, "cpu_s": cpu}


def idle_cpu(threshold: float, seconds: float) -> float:
    """CPU seconds per second of a process with an idle process loop (the detector's floor)."""
    GlobalNeo4jConnectionPool.set_config(target_config(threshold))
    runner.use_process_loop()
    try:
        runner.process_loop()
        cpu = time.process_time()
        time.sleep(seconds)
        return (time.process_time() - cpu) / seconds
    finally:
        runner.close_process_loop(10)


def target_config(threshold: float) -> Any:
    """A configuration that needs no server: the idle loop borrows nothing."""
    from neopool import Neo4jConnectionConfig

    return Neo4jConnectionConfig(uri="bolt://127.0.0.1:7687", blocked_loop_threshold=threshold)


def quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles of ``values``."""
    if len(values) < 2:
        return values[0], values[0]
    first, _, third = statistics.quantiles(values, n=4)
    return first, third


def main() -> None:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--rounds", type=int, default=20, help="rounds per mode (default 20)")
    cli.add_argument("--calls", type=int, default=100, help="calls per thread and round")
    cli.add_argument("--threads", type=int, default=16, help="threads calling (-c of a worker)")
    args = cli.parse_args()
    if args.quick:
        args.rounds, args.calls = 2, 20
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    idle: dict[str, list[float]] = {ON: [], OFF: []}
    for r in range(4):
        for mode in (ON, OFF) if r % 2 == 0 else (OFF, ON):
            idle[mode].append(idle_cpu(THRESHOLDS[mode], 1.0 if args.quick else 5.0))
    idle_cost = statistics.median(idle[ON]) - statistics.median(idle[OFF])
    print(f"idle process loop: the detector costs {idle_cost * 1e3:.2f} ms of CPU per second")
    with bolt_target() as target:
        # The detector is switched per block (below), not by the configuration.
        GlobalNeo4jConnectionPool.set_config(
            target.config(blocked_loop_threshold=0, pool_max_size=args.threads)
        )
        runner.use_process_loop()
        try:
            for workload in WORKLOADS:
                for _ in range(2):  # warm: the loop, its pool, its driver and sockets
                    one_round(workload, args.threads, max(1, args.calls // 4), THRESHOLDS[ON])
                by_mode: dict[str, list[dict[str, float]]] = {ON: [], OFF: []}
                for r in range(args.rounds):
                    order = (ON, OFF) if r % 4 in (0, 3) else (OFF, ON)  # ABBA
                    for mode in order:
                        by_mode[mode].append(
                            one_round(workload, args.threads, args.calls, THRESHOLDS[mode])
                        )
                results[workload] = by_mode
        finally:
            runner.use_process_loop(False)
            runner.close_process_loop(10)

    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    for workload, by_mode in results.items():
        medians = {
            mode: {
                key: statistics.median(r[key] for r in rounds)
                for key in ("calls_per_s", "cpu_us_per_call")
            }
            for mode, rounds in by_mode.items()
        }
        # Each round ran both modes back to back: the ratio within a round cancels the drift
        # of the machine's load between rounds.
        pairs = list(zip(by_mode[ON], by_mode[OFF], strict=True))
        throughput_ratios = [on["calls_per_s"] / off["calls_per_s"] for on, off in pairs]
        cpu_ratios = [on["cpu_us_per_call"] / off["cpu_us_per_call"] for on, off in pairs]
        throughput, cpu = statistics.median(throughput_ratios), statistics.median(cpu_ratios)
        # The spread of the rounds' ratios: the noise a median of them sits in.
        throughput_iqr, cpu_iqr = quartiles(throughput_ratios), quartiles(cpu_ratios)
        watchdog_share = statistics.median(r["watchdog_cpu_share"] for r in by_mode[ON])
        print(
            f"{workload}: the watchdog thread's own CPU is {100 * watchdog_share:.3f}% of the "
            "process's CPU with the detector on (median of the rounds)"
        )
        summary[workload] = {
            "watchdog_cpu_share": watchdog_share,
            "medians": medians,
            "throughput_on_off": throughput,
            "throughput_on_off_quartiles": throughput_iqr,
            "cpu_on_off": cpu,
            "cpu_on_off_quartiles": cpu_iqr,
            "rounds": by_mode,
        }
        for mode in (OFF, ON):
            rows.append(
                [
                    workload,
                    mode,
                    f"{medians[mode]['calls_per_s']:.0f}",
                    f"{medians[mode]['cpu_us_per_call']:.0f}",
                    ""
                    if mode == OFF
                    else f"{throughput:.3f} ({throughput_iqr[0]:.3f}-{throughput_iqr[1]:.3f})",
                    "" if mode == OFF else f"{cpu:.3f} ({cpu_iqr[0]:.3f}-{cpu_iqr[1]:.3f})",
                ]
            )
    table(
        f"Blocked-loop detector cost: {args.threads} threads x {args.calls} calls, "
        f"median of {args.rounds} rounds each",
        [
            "workload",
            "mode",
            "calls/s",
            "CPU us/call",
            "throughput on/off (paired; quartiles)",
            "CPU on/off (paired; quartiles)",
        ],
        rows,
    )
    save(
        "blocked_loop_cost",
        {
            "rounds": args.rounds,
            "calls": args.calls,
            "threads": args.threads,
            "idle_cpu_s_per_s": idle,
            "idle_cost_cpu_s_per_s": idle_cost,
            **summary,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
