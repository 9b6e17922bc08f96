"""Worker modes side by side: the same task on differently configured Celery workers.

Shared by ``celery_tasks.py`` (short I/O-bound tasks) and ``lightrag_ingest.py``
(LightRAG ingestion with a fake LLM). Each mode is a task sent to a worker of
its own kind (:class:`~neopool.demo.app.WorkerKind`: pool, concurrency, loop
mode); all workers run at once on the same cores, and the modes take turns in
rounds (order rotating), through :func:`neopool.demo.main.measure`.

Besides throughput and latency (each task's own duration, measured in the
worker), it counts each worker process's Bolt sockets with psutil: at peak
(sampled every few milliseconds while a mode runs) and at rest (once its round
is over and its tasks are done).
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from common import table
from neopool.demo.app import WorkerKind
from neopool.demo.environment import Endpoints
from neopool.demo.main import DemoOptions, measure

#: Seconds between socket samples while a mode runs. The sockets of these modes live
#: as long as their pools; sampling much more often (it reads /proc) took this
#: process several ms of CPU per task, from the cores the modes compete for.
SAMPLE_EVERY = 0.25
#: Seconds after a round before the at-rest sample (results are back; let acks settle).
SETTLE = 0.3


#: The modes both benchmarks compare, by name.
PREFORK = "prefork"
PER_THREAD = "threads, a loop per thread"
PROCESS = "threads, process loop"
PROCESSES = "threads, process loop, several workers"


@dataclass(frozen=True)
class Mode:
    """A task on a kind of worker."""

    task: str
    kind: WorkerKind


def add_worker_options(cli: argparse.ArgumentParser, in_flight: int, per_thread: int) -> None:
    """The worker sizes both benchmarks take; :func:`worker_modes` reads them."""
    cli.add_argument(
        "--in-flight", type=int, default=in_flight, help=f"process loop: threads -c ({in_flight})"
    )
    cli.add_argument(
        "--per-thread",
        type=int,
        default=per_thread,
        help=f"a loop per thread: threads -c ({per_thread})",
    )
    cli.add_argument("--processes", type=int, default=2, help="prefork -c (default 2)")
    cli.add_argument(
        "--workers",
        type=int,
        default=None,
        help="process-loop workers of the last mode (default: prefork's processes; 1: none)",
    )


def parse_worker_args(cli: argparse.ArgumentParser) -> argparse.Namespace:
    """The options, ``--workers`` made prefork's process count when not given."""
    args = cli.parse_args()
    args.workers = args.workers or args.processes
    return args


def worker_modes(task: str, args: argparse.Namespace) -> dict[str, Mode]:
    """``task`` on prefork, a loop per thread, one process-loop worker and (``--workers``
    above 1) that many process-loop workers."""
    workers = args.workers
    chosen = {
        PREFORK: Mode(task, WorkerKind("prefork", args.processes)),
        PER_THREAD: Mode(task, WorkerKind("threads", args.per_thread)),
        PROCESS: Mode(task, WorkerKind("threads", args.in_flight, "process")),
    }
    if workers > 1:
        chosen[PROCESSES] = Mode(task, WorkerKind("threads", args.in_flight, "process", workers))
    return chosen


def bolt_sockets(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to ``port`` (the Bolt server or proxy)."""
    import psutil

    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0
    return sum(
        1
        for c in connections
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds each process (all its threads) has used so far."""
    import psutil

    used = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = psutil.Process(pid).cpu_times()
            used[pid] = times.user + times.system
    return used


def machine_cpu_seconds() -> tuple[float, float]:
    """The machine's CPU seconds so far, summed over its cores: busy, and in all."""
    import psutil

    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    every = sum(times)
    return every - idle, every


def listener(port: int) -> int | None:
    """The process listening on ``port`` here (the Bolt server, or the proxy in front of it)."""
    import psutil

    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            return int(connection.pid) if connection.pid is not None else None
    return None


@dataclass
class SocketCounts:
    """Per mode: Bolt sockets per worker process (the most seen at once, and at rest),
    and the worker processes' CPU while the mode ran (all of it, and the busiest one's share)."""

    peak: dict[str, int] = field(default_factory=dict)
    at_rest: dict[str, int] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    wall_s: dict[str, float] = field(default_factory=dict)
    busiest: dict[str, float] = field(default_factory=dict)
    #: CPU of what listens on the Bolt port (the server on loopback, else the proxy).
    server_cpu_s: dict[str, float] = field(default_factory=dict)
    #: The whole machine's CPU while the mode ran: busy and all (seconds summed over cores).
    machine_busy_s: dict[str, float] = field(default_factory=dict)
    machine_all_s: dict[str, float] = field(default_factory=dict)
    #: This process's CPU while the mode ran: it sends the tasks, reads their results
    #: and samples the sockets (load that a deployment runs elsewhere).
    client_cpu_s: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def observe(self, mode: str, pids: list[int], endpoints: Endpoints) -> Iterator[None]:
        port = urlsplit(endpoints.config.uri).port or 7687
        done = threading.Event()

        def sample() -> int:
            return max((bolt_sockets(pid, port) for pid in pids), default=0)

        def sampler() -> None:
            while not done.is_set():
                self.peak[mode] = max(self.peak.get(mode, 0), sample())
                done.wait(SAMPLE_EVERY)

        thread = threading.Thread(target=sampler, name="socket-sampler", daemon=True)
        server = listener(port)
        servers = [server] if server is not None else []
        server_before = sum(cpu_seconds(servers).values())
        machine_before = machine_cpu_seconds()
        client_before = time.process_time()
        cpu_before, started = cpu_seconds(pids), time.monotonic()
        thread.start()
        try:
            yield
        finally:
            cpu_after, wall = cpu_seconds(pids), time.monotonic() - started
            busy, every = (
                after - before
                for after, before in zip(machine_cpu_seconds(), machine_before, strict=True)
            )
            self.client_cpu_s[mode] = (
                self.client_cpu_s.get(mode, 0.0) + time.process_time() - client_before
            )
            self.machine_busy_s[mode] = self.machine_busy_s.get(mode, 0.0) + busy
            self.machine_all_s[mode] = self.machine_all_s.get(mode, 0.0) + every
            server_used = sum(cpu_seconds(servers).values()) - server_before
            self.server_cpu_s[mode] = self.server_cpu_s.get(mode, 0.0) + server_used
            done.set()
            thread.join()
            used = {pid: cpu_after[pid] - cpu_before.get(pid, 0.0) for pid in cpu_after}
            self.cpu_s[mode] = self.cpu_s.get(mode, 0.0) + sum(used.values())
            self.wall_s[mode] = self.wall_s.get(mode, 0.0) + wall
            busiest = max(used.values(), default=0.0) / wall if wall else 0.0
            self.busiest[mode] = max(self.busiest.get(mode, 0.0), busiest)
            time.sleep(SETTLE)
            self.at_rest[mode] = sample()  # the last round's figure stands


def compare(
    modes: Mapping[str, Mode],
    *,
    tasks: int,
    rounds: int,
    rtt_ms: float,
    warmup: int,
    name: str,
    worker_env: Mapping[str, str] | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """Run every mode in alternating rounds; figures per mode, with sockets per process."""
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    sockets = SocketCounts()
    options = DemoOptions(
        tasks=tasks,
        rounds=rounds,
        rtt_ms=rtt_ms,
        warmup=warmup,
        modes=tuple(modes),
        kinds={mode: m.kind for mode, m in modes.items()},
        tasks_of={mode: m.task for mode, m in modes.items()},
        worker_env=dict(worker_env or {}),
        observe=sockets.observe,
        name=name,
        chart=False,
    )
    measured = measure(options, console)
    for mode, figures in measured["modes"].items():
        figures["worker"] = modes[mode].kind.describe()
        figures["sockets_per_process_peak"] = sockets.peak.get(mode, 0)
        figures["sockets_per_process_at_rest"] = sockets.at_rest.get(mode, 0)
        # Rounds only (the warm-up is observed too, but not counted in "tasks").
        figures["worker_cpu_ms_per_task"] = round(
            1000 * sockets.cpu_s.get(mode, 0.0) / max(1, figures["tasks"] + warmup), 1
        )
        figures["busiest_process_cpu_pct"] = round(100 * sockets.busiest.get(mode, 0.0))
        figures["bolt_listener_cpu_ms_per_task"] = round(
            1000 * sockets.server_cpu_s.get(mode, 0.0) / max(1, figures["tasks"] + warmup), 1
        )
        figures["client_cpu_ms_per_task"] = round(
            1000 * sockets.client_cpu_s.get(mode, 0.0) / max(1, figures["tasks"] + warmup), 1
        )
        every = sockets.machine_all_s.get(mode, 0.0)
        figures["machine_cpu_pct"] = (
            round(100 * sockets.machine_busy_s.get(mode, 0.0) / every) if every else 0
        )
    return measured


def columns(rate: str = "tasks/s", latency: str = "ms") -> list[str]:
    """Columns of :func:`rows`: the throughput and latency units as given."""
    return [
        "mode",
        rate,
        f"p50 {latency}",
        f"p99 {latency}",
        "sockets/process at rest",
        "sockets/process peak",
        "drivers",
        "errors",
        "worker CPU ms/task",
        "busiest process CPU %",
        "server (or proxy) CPU ms/task",
        "sender CPU ms/task",
        "machine CPU %",
    ]


def rows(modes: Mapping[str, Mapping[str, Any]], *, per_minute: bool = False) -> list[list[Any]]:
    """One table row per mode, in :func:`columns` order (``per_minute``: per minute, in s)."""
    rate, latency = (60.0, 0.001) if per_minute else (1.0, 1.0)
    return [
        [
            m["worker"],
            round(rate * m["tasks_per_s"], 1),
            m["p50_ms"] * latency,
            m["p99_ms"] * latency,
            m["sockets_per_process_at_rest"],
            m["sockets_per_process_peak"],
            m["drivers_created"],
            m["errors"],
            m["worker_cpu_ms_per_task"],
            m["busiest_process_cpu_pct"],
            m["bolt_listener_cpu_ms_per_task"],
            m["client_cpu_ms_per_task"],
            m["machine_cpu_pct"],
        ]
        for m in modes.values()
    ]


def report(
    measured: dict[str, Any],
    checked: list[list[Any]],
    title: str,
    columns: list[str],
    table_rows: list[list[Any]],
) -> dict[str, Any]:
    """Print the modes' table, first errors and targets; what goes into the JSON."""
    figures = measured["modes"]
    table(title, columns, table_rows)
    for name, m in figures.items():
        if m["first_error"]:
            print(f"{name}: first error: {m['first_error'][:300]}")
    table("targets", ["target", "measured", "met"], checked)
    return {
        "modes": figures,
        "settings": measured["settings"],
        "pool_stats": measured["pool_stats"],
        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in checked],
    }


def shutdown_seconds(
    kind: WorkerKind, *, hold_s: float, drain_s: float, rtt_ms: float = 0.0
) -> dict[str, Any]:
    """A warm shutdown with ``kind.concurrency`` tasks in flight, each holding a lease ``hold_s``.

    Seconds from SIGTERM until the worker process has exited, the tasks that
    finished, and the worker's Bolt sockets left open afterwards (none).
    """
    import uuid

    import redis
    from rich.console import Console

    from neopool.demo.app import build_app
    from neopool.demo.environment import demo_servers
    from neopool.demo.worker import DemoWorker

    console = Console(stderr=True)
    with demo_servers(rtt_ms, lambda text: console.print(f"[dim]{text}[/dim]")) as endpoints:
        queue = f"shutdown-{uuid.uuid4().hex[:8]}"
        app = build_app(endpoints.broker_url, queue)
        # Every task holds a lease until the end: as many leases as tasks in flight.
        env = {
            "NEOPOOL_CELERY_DRAIN_TIMEOUT": str(drain_s),
            "NEOPOOL_POOL_MAX_SIZE": str(max(kind.concurrency, endpoints.config.pool_max_size)),
        }
        worker = DemoWorker(app, endpoints.config, kind=kind, queue=queue, env=env, loglevel="INFO")
        with worker:
            key = f"{queue}-started"
            sent = [
                app.send_task("neopool.testing.hold", args=[hold_s, key])
                for _ in range(kind.concurrency)
            ]
            client = redis.Redis.from_url(endpoints.broker_url)
            for _ in sent:
                assert client.blpop([key], timeout=60) is not None, "a task did not start"
            pids = worker.process_ids()
            port = urlsplit(endpoints.config.uri).port or 7687
            sockets_before = max(bolt_sockets(pid, port) for pid in pids)
            started = time.monotonic()
            code = worker.stop(timeout=120)
            seconds = time.monotonic() - started
            finished = sum(1 for r in sent if r.ready() and r.successful())
            log = worker.log()
            for result in sent:  # stop listening for results that will not come
                result.forget()
    return {
        "worker": kind.describe(),
        "tasks_in_flight": kind.concurrency,
        "task_seconds_left": hold_s,
        "drain_timeout_s": drain_s,
        "shutdown_s": round(seconds, 2),
        "exit_code": code,
        "tasks_finished": finished,
        "sockets_before": sockets_before,
        "neopool_says": next(
            (line.split("neopool: ", 1)[1] for line in log.splitlines() if "shut down" in line),
            "",
        ),
    }
