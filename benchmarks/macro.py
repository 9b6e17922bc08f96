"""Macro benchmark: the demo's Celery workload, more tasks, four modes, two networks.

A real prefork worker (2 processes) runs LightRAG-style ingestion tasks
(borrow, prepare a workspace, MERGE 3 entities and 2 relations, return) as:
a new driver per task, neopool under ``asyncio.run`` per task, neopool on the
persistent runner, and a hand-written ideal (one driver kept on one persistent
loop per process). Modes alternate round by round in one run (their order
rotating), so they share the machine's state. Connections are counted in each worker process.
"""

from __future__ import annotations

from typing import Any

from common import network_label, parser, save, table
from neopool.demo.app import MODE_TASKS
from neopool.demo.main import DemoOptions, measure
from neopool.demo.report import MODE_COLUMNS, mode_rows

MODES = tuple(MODE_TASKS)
RUNNER = "neopool + persistent runner"
NEW = "new driver per task"
IDEAL = "ideal (one driver, one loop per process)"


def main() -> None:
    cli = parser(__doc__ or "")
    cli.add_argument("--tasks", type=int, default=None, help="tasks per mode (default 3000)")
    cli.add_argument("--workers", type=int, default=2, help="prefork processes (default 2)")
    args = cli.parse_args()
    # Rounds of 500 tasks: long enough (seconds, even on a quiet machine) that starting and
    # draining a round is noise, and six of them, so drift hits every mode alike.
    tasks = args.tasks or (60 if args.quick else 3000)
    rounds = 2 if args.quick else 6
    from rich.console import Console

    console = Console(stderr=True)
    results: dict[str, Any] = {"networks": {}}
    for rtt in args.rtt_ms:
        label = network_label(rtt)
        console.print(f"[bold]macro, {label}[/bold]")
        options = DemoOptions(
            tasks=tasks, workers=args.workers, rtt_ms=rtt, modes=MODES, rounds=rounds
        )
        measured = measure(options, console)
        modes = measured["modes"]
        results["networks"][label] = {
            "modes": modes,
            "settings": measured["settings"],
            "ratios": ratios(modes, args.workers),
        }
        results.setdefault("machine_at_start", measured["machine"])
    report(results)
    save("macro", results, args.json)


def ratios(modes: dict[str, Any], workers: int) -> dict[str, Any]:
    def tps(name: str) -> float:
        return float(modes[name]["tasks_per_s"]) or float("nan")

    return {
        "runner_over_new_driver_throughput": round(tps(RUNNER) / tps(NEW), 2),
        "asyncio_run_over_new_driver_throughput": round(
            tps("neopool + asyncio.run per task") / tps(NEW), 2
        ),
        "runner_vs_ideal_throughput_pct": round(100 * (tps(RUNNER) / tps(IDEAL) - 1), 1),
        "runner_p50_vs_new_driver_p50": round(modes[NEW]["p50_ms"] / modes[RUNNER]["p50_ms"], 2),
        "runner_connections_per_worker_process": modes[RUNNER]["connections_opened"] / workers,
        "runner_connections_by_round": modes[RUNNER]["connections_by_round"],
        "new_driver_connections_by_round": modes[NEW]["connections_by_round"],
    }


def report(results: dict[str, Any]) -> None:
    for label, figures in results["networks"].items():
        modes = figures["modes"]
        table(
            f"Celery ingestion, {label}, {figures['settings']['tasks_per_mode']} tasks per mode "
            f"in {figures['settings']['rounds']} alternating rounds",
            MODE_COLUMNS,
            mode_rows(modes),
        )
        r = figures["ratios"]
        rows = [
            ("runner / new driver per task, tasks/s", r["runner_over_new_driver_throughput"], "x"),
            ("asyncio.run / new driver, tasks/s", r["asyncio_run_over_new_driver_throughput"], "x"),
            ("runner vs hand-written ideal, tasks/s %", r["runner_vs_ideal_throughput_pct"], ""),
            ("p50 latency, new driver / runner", r["runner_p50_vs_new_driver_p50"], "x"),
            (
                "runner Bolt conns per worker process",
                r["runner_connections_per_worker_process"],
                "",
            ),
            ("runner conns: warm-up, then each round", r["runner_connections_by_round"], ""),
            (
                "new-driver conns: warm-up, then each round",
                r["new_driver_connections_by_round"],
                "",
            ),
        ]
        table(f"ratios, {label}", ["figure", "value"], [[t, f"{v}{u}"] for t, v, u in rows])


if __name__ == "__main__":
    main()
