"""One demo run, from servers to report; Ctrl-C stops everything it started."""

from __future__ import annotations

import contextlib
import signal
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from neopool.demo.app import DEFAULT_QUEUE, PROCESS_LOOP_MODE, TASKS, WorkerKind
from neopool.demo.modes import ModeResult, run_mode
from neopool.demo.report import (
    MODE_COLUMNS,
    RESULTS_DIR,
    machine_info,
    mode_rows,
    print_table,
    write_json,
)

if TYPE_CHECKING:
    from neopool.demo.environment import Endpoints

#: The modes ``neopool demo`` compares, in the order it runs them.
DEMO_MODES = (
    "new driver per task",
    "neopool + asyncio.run per task",
    "neopool + persistent runner",
    PROCESS_LOOP_MODE,
)
WORKSPACE = "neopool_demo"
#: Tasks in flight in the process-loop worker unless told otherwise.
DEFAULT_IN_FLIGHT = 16

#: ``observe(mode, worker pids, servers)``: a context manager around each round of a mode.
Observer = Callable[[str, list[int], "Endpoints"], AbstractContextManager[None]]


@dataclass
class DemoOptions:
    """What to run and where to write it (the CLI's options)."""

    tasks: int = 300
    workers: int = 2
    in_flight: int = DEFAULT_IN_FLIGHT
    rtt_ms: float = 0.0
    json_path: Path | None = None
    chart: bool = True
    metrics_port: int | None = None
    modes: Sequence[str] = DEMO_MODES
    rounds: int = 1
    warmup: int | None = None  #: unmeasured tasks per mode first (default: tasks // 10)
    name: str = "demo"
    quiet: bool = False
    #: Which worker runs each mode (default: see :meth:`worker_of`).
    kinds: Mapping[str, WorkerKind] = field(default_factory=dict)
    #: Which task each mode sends (default: :data:`neopool.demo.app.TASKS`).
    tasks_of: Mapping[str, str] = field(default_factory=dict)
    #: Extra environment of every worker.
    worker_env: Mapping[str, str] = field(default_factory=dict)
    observe: Observer | None = None
    results: dict[str, Any] = field(default_factory=dict)

    def worker_of(self, mode: str) -> WorkerKind:
        """The process-loop mode on a threads worker with ``in_flight`` threads; others prefork."""
        if mode in self.kinds:
            return self.kinds[mode]
        if mode == PROCESS_LOOP_MODE:
            return WorkerKind("threads", self.in_flight, "process")
        return WorkerKind("prefork", self.workers)

    def task_of(self, mode: str) -> str:
        return self.tasks_of.get(mode) or TASKS[mode]

    def output(self, suffix: str) -> Path:
        if suffix == ".json" and self.json_path is not None:
            return self.json_path
        base = self.json_path.with_suffix("") if self.json_path else RESULTS_DIR / self.name
        return base.with_suffix(suffix)


def measure(options: DemoOptions, console: Any) -> dict[str, Any]:
    """Start servers and the workers the modes need, run every mode, gather pool stats."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from neopool.celery import cluster_stats
    from neopool.demo.app import build_app
    from neopool.demo.environment import demo_servers
    from neopool.demo.worker import DemoWorker

    def say(text: str) -> None:
        console.print(f"[dim]{text}[/dim]")

    kinds = list(dict.fromkeys(options.worker_of(mode) for mode in options.modes))
    with demo_servers(options.rtt_ms, say) as endpoints, contextlib.ExitStack() as stack:
        say(f"Bolt server: {endpoints.bolt_description}")
        say(f"broker: {endpoints.broker_description}")
        workers: dict[WorkerKind, list[DemoWorker]] = {}
        apps: dict[WorkerKind, Any] = {}
        for kind in kinds:
            queue = f"{DEFAULT_QUEUE}-{uuid.uuid4().hex[:8]}"
            apps[kind] = build_app(endpoints.broker_url, queue)
            say(f"starting a Celery worker ({kind.describe()})...")
            workers[kind] = [
                stack.enter_context(
                    DemoWorker(
                        apps[kind],
                        endpoints.config,
                        kind=kind,
                        queue=queue,
                        env=dict(options.worker_env),
                        index=index,
                    )
                )
                for index in range(kind.workers)
            ]
        stack.enter_context(_metrics(list(apps.values()), options.metrics_port, say))
        say(f"workers are up; {options.tasks} tasks per mode")
        results = {name: ModeResult(name, 0) for name in options.modes}
        run_id = uuid.uuid4().hex[:8]
        per_round = max(1, options.tasks // options.rounds)
        columns = (
            TextColumn("{task.description:<44}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )

        def one_round(name: str, tasks: int, run: str, progress: Any = None) -> ModeResult:
            kind = options.worker_of(name)
            observed: AbstractContextManager[None] = contextlib.nullcontext()
            if options.observe is not None:
                pids = [pid for worker in workers[kind] for pid in worker.process_ids()]
                observed = options.observe(name, pids, endpoints)
            with observed:
                return run_mode(
                    apps[kind],
                    name,
                    options.task_of(name),
                    tasks,
                    workspace=WORKSPACE,
                    run_id=run,
                    progress=progress,
                )

        warmup = options.tasks // 10 if options.warmup is None else options.warmup
        if warmup:
            say(f"warming up: {warmup} unmeasured tasks per mode (server JIT, imports)")
            for name in options.modes:
                results[name].count_warmup(one_round(name, warmup, f"{run_id}-warmup"))
        with Progress(*columns, console=console, disable=options.quiet) as progress:
            for round_number in range(options.rounds):
                # Rotate the order each round: no mode always follows the same one.
                shift = round_number % len(options.modes)
                for name in [*options.modes[shift:], *options.modes[:shift]]:
                    one = one_round(name, per_round, f"{run_id}-{round_number}", progress)
                    _merge(results[name], one)
        pool_stats: dict[str, Any] = {}
        for app in apps.values():
            pool_stats.update(cluster_stats(app, timeout=3.0))
    return {
        "modes": {name: result.summary() for name, result in results.items()},
        "machine": machine_info(),
        "settings": {
            "tasks_per_mode": per_round * options.rounds,
            "rounds": options.rounds,
            "warmup_tasks_per_mode": warmup,
            "worker_processes": options.workers,
            "worker_pool": "prefork",
            "workers": {name: options.worker_of(name).describe() for name in options.modes},
            "rtt_ms": options.rtt_ms,
            "network": "loopback" if options.rtt_ms <= 0 else "latency proxy",
            "bolt_server": endpoints.bolt_description,
            "broker": endpoints.broker_description,
            "task": "borrow, prepare workspace, MERGE 3 entities + 2 relations, return",
        },
        "pool_stats": pool_stats,
    }


def _merge(total: ModeResult, one: ModeResult) -> None:
    total.tasks += one.tasks
    total.seconds += one.seconds
    total.durations_ms += one.durations_ms
    total.connections_opened += one.connections_opened
    total.connections_by_round.append(one.connections_opened)
    total.drivers_created += one.drivers_created
    total.errors += one.errors
    total.first_error = total.first_error or one.first_error


@contextlib.contextmanager
def _metrics(apps: list[Any], port: int | None, say: Any) -> Iterator[None]:
    """Serve the workers' pool metrics on /metrics while the demo runs, if asked."""
    if port is None:
        yield
        return
    from prometheus_client import CollectorRegistry

    from neopool.metrics import Sample, cluster_source, serve

    sources = [cluster_source(app) for app in apps]

    def every_worker() -> Iterator[Sample]:
        for source in sources:
            yield from source()

    server = serve(port, registry=CollectorRegistry(), source=every_worker)
    say(f"Prometheus metrics of the workers' pools: {server.url}")
    try:
        yield
    finally:
        server.stop()


def report(results: dict[str, Any], options: DemoOptions, console: Any) -> list[Path]:
    """The table, the pool stats, the JSON and the chart; returns the files written."""
    modes = results["modes"]
    print_table(
        f"{options.tasks} LightRAG-style ingestion tasks per mode, "
        + ("loopback" if options.rtt_ms <= 0 else f"{options.rtt_ms:g} ms RTT"),
        MODE_COLUMNS,
        mode_rows(modes),
        caption=_workers_caption(results["settings"]["workers"]),
    )
    for name, m in modes.items():
        if m["first_error"]:
            console.print(f"[red]{name}: first error: {m['first_error']}[/red]")
    _speedups(modes, console)
    _pool_stats(results["pool_stats"])
    written = [write_json(results, options.output(".json"))]
    if options.chart:
        from neopool.demo.chart import bar_chart

        machine = results["machine"]
        written.append(
            bar_chart(
                options.output(".png"),
                "neopool: Celery ingestion tasks, four ways",
                [
                    ("tasks/s (higher is better)", {n: m["tasks_per_s"] for n, m in modes.items()}),
                    ("p50 task latency, ms", {n: m["p50_ms"] for n, m in modes.items()}),
                    ("p99 task latency, ms", {n: m["p99_ms"] for n, m in modes.items()}),
                    (
                        "Bolt connections opened",
                        {n: m["connections_opened"] for n, m in modes.items()},
                    ),
                ],
                subtitle=(
                    f"{results['settings']['tasks_per_mode']} tasks per mode, "
                    f"{options.workers} prefork processes or 1 process with "
                    f"{options.in_flight} tasks in flight, {results['settings']['network']}"
                    f"{'' if options.rtt_ms <= 0 else f' {options.rtt_ms:g} ms RTT'}; "
                    f"Python {machine['python']}, {machine['cpu_count']} CPUs ({machine['cpu']})"
                ),
            )
        )
    return written


def _workers_caption(workers: Mapping[str, str]) -> str:
    """``ran on: prefork -c 2, a loop per process (3 modes); threads -c 16, ... (1 mode)``."""
    counts: dict[str, int] = {}
    for kind in workers.values():
        counts[kind] = counts.get(kind, 0) + 1
    return "ran on: " + "; ".join(
        f"{kind} ({n} mode{'s' if n > 1 else ''})" for kind, n in counts.items()
    )


def _speedups(modes: dict[str, Any], console: Any) -> None:
    before = modes.get("new driver per task")
    if not before or not before["tasks_per_s"]:
        return
    for name, m in modes.items():
        if name != "new driver per task" and m["tasks_per_s"]:
            console.print(
                f"{name}: [bold]{m['tasks_per_s'] / before['tasks_per_s']:.2f}x[/bold] the "
                f"throughput of a new driver per task; p50 task latency {m['p50_ms']:.1f} ms "
                f"against {before['p50_ms']:.1f} ms"
            )


def _pool_stats(stats: dict[str, Any]) -> None:
    rows = []
    for node, by_pid in sorted(stats.items()):
        for pid, by_loop in sorted(by_pid.items()):
            for loop_id, s in by_loop.items():
                rows.append(
                    [
                        node,
                        pid,
                        loop_id,
                        s["thread"],
                        s["borrows"],
                        s["drivers_created"],
                        s["reuse_ratio"],
                        s["in_use"],
                        s["available"],
                        s["max_wait_ms"],
                    ]
                )
    print_table(
        "pool stats from the workers (celery inspect neopool_stats)",
        [
            "worker",
            "pid",
            "loop",
            "thread",
            "borrows",
            "drivers",
            "reuse",
            "in use",
            "avail",
            "max wait ms",
        ],
        rows or [["(no pools reported)", "", "", "", "", "", "", "", "", ""]],
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(options: DemoOptions) -> int:
    """Run the demo; 0 when every task succeeded, 1 on errors, 130 on Ctrl-C."""
    from rich.console import Console

    console = Console(stderr=True)
    # Ctrl-C and SIGTERM both stop the run and clean up. SIGINT is set here too: a
    # process that inherits it ignored (a background job of a script) would not get
    # Python's KeyboardInterrupt otherwise.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        console.print(
            "[bold]neopool demo[/bold]: the same Celery ingestion task four ways "
            "(a new driver per task, neopool under asyncio.run, neopool on the persistent "
            "runner, and neopool's process loop with many tasks in flight)"
        )
        results = measure(options, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: worker, proxy and servers were stopped[/yellow]")
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    options.results = results
    written = report(results, options, console)
    for path in written:
        console.print(f"wrote {path}")
    errors = sum(m["errors"] for m in results["modes"].values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(run_demo(DemoOptions()))
