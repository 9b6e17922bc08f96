"""Celery tasks per second: pooled (persistent loop) against a new driver per task.

Starts a real Bolt server (embedded ArcadeDB) behind a counting TCP proxy, a
real Valkey broker, and two real prefork workers, one per mode, then runs
rounds of N ingestion tasks (borrow, prepare a workspace, MERGE 3 entities and
2 relations) alternately in each mode, so both see the same machine state.

    python benchmarks/celery_tasks.py [--tasks 200] [--rounds 3] [--pool prefork] [-c 2]

Prints a table and writes results/celery_tasks.json. On loopback the broker and
result-backend round trips dominate a task, so the gap is smaller than across
a network, where every new driver also pays TCP, Bolt and TLS set-up latency.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from neopool.celery import cluster_stats
from neopool.config import Neo4jConnectionConfig
from neopool.embedded.arcadedb import BoltServer
from neopool.embedded.valkey import BrokerServer
from neopool.testing.celery_app import make_app
from neopool.testing.proxy import TcpProxy
from neopool.testing.worker_process import CeleryWorkerProcess

MODES = {
    "pooled": "neopool.testing.ingest",
    "new_driver_per_task": "neopool.testing.ingest_new_driver",
}


def run_round(app: Any, task: str, tasks: int, workspace: str) -> float:
    """Seconds from the first send to the last result of ``tasks`` tasks."""
    started = time.perf_counter()
    results = [app.send_task(task, args=[workspace, f"doc-{i}", 3]) for i in range(tasks)]
    for result in results:
        result.get(timeout=300)
    return time.perf_counter() - started


def drivers_so_far(app: Any, node: str) -> int:
    stats = cluster_stats(app).get(node, {})
    return sum(s["drivers_created"] for loops in stats.values() for s in loops.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool", default="prefork", choices=["prefork", "threads", "solo"])
    parser.add_argument("-c", "--concurrency", type=int, default=2)
    parser.add_argument("--out", default="results/celery_tasks.json")
    args = parser.parse_args()

    with (
        BoltServer() as server,
        BrokerServer() as broker,
        TcpProxy("127.0.0.1", server.bolt_port) as proxy,
    ):
        config = Neo4jConnectionConfig(
            uri=proxy.uri(), username=server.username, password=server.password
        )
        apps: dict[str, Any] = {}
        workers: dict[str, CeleryWorkerProcess] = {}
        try:
            for mode in MODES:
                queue = f"bench-{mode}-{uuid.uuid4().hex[:6]}"
                apps[mode] = make_app(broker.url, config, queue=queue, main=queue)
                workers[mode] = CeleryWorkerProcess(
                    apps[mode],
                    config,
                    pool=args.pool,
                    concurrency=args.concurrency,
                    queue=queue,
                    loglevel="WARNING",
                ).start()
            rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
            for round_no in range(args.rounds):
                for mode, task in MODES.items():
                    app, node = apps[mode], workers[mode].nodename
                    opened = proxy.connections_opened
                    drivers = drivers_so_far(app, node)
                    seconds = run_round(app, task, args.tasks, f"bench-{mode}-{round_no}")
                    opened = proxy.connections_opened - opened
                    if mode == "pooled":
                        drivers = drivers_so_far(app, node) - drivers
                    else:
                        drivers = args.tasks  # asyncio.run + a driver in every task
                    rows[mode].append(
                        {
                            "seconds": round(seconds, 3),
                            "tasks_per_second": round(args.tasks / seconds, 1),
                            "drivers_opened": drivers,
                            "bolt_connections_opened": opened,
                        }
                    )
        finally:
            for worker in workers.values():
                try:
                    worker.stop()
                finally:
                    worker.kill()

    summary = {
        mode: {
            "median_tasks_per_second": statistics.median(r["tasks_per_second"] for r in runs),
            "drivers_opened_first_round": runs[0]["drivers_opened"],
            "drivers_opened_later_rounds": [r["drivers_opened"] for r in runs[1:]],
            "bolt_connections_first_round": runs[0]["bolt_connections_opened"],
            "bolt_connections_later_rounds": [r["bolt_connections_opened"] for r in runs[1:]],
            "rounds": runs,
        }
        for mode, runs in rows.items()
    }
    speedup = (
        summary["pooled"]["median_tasks_per_second"]
        / summary["new_driver_per_task"]["median_tasks_per_second"]
    )
    report = {
        "tasks_per_round": args.tasks,
        "rounds": args.rounds,
        "pool": args.pool,
        "concurrency": args.concurrency,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "speedup_pooled_over_new_driver": round(speedup, 2),
        "modes": summary,
    }
    print(
        f"\n{args.tasks} tasks x {args.rounds} rounds, --pool={args.pool} "
        f"-c {args.concurrency}, loopback\n"
    )
    print(f"{'mode':<22}{'tasks/s (median)':>18}{'drivers/round':>16}{'bolt conns/round':>20}")
    for mode, s in summary.items():
        drivers = [r["drivers_opened"] for r in s["rounds"]]
        conns = [r["bolt_connections_opened"] for r in s["rounds"]]
        print(
            f"{mode:<22}{s['median_tasks_per_second']:>18.1f}"
            f"{'/'.join(map(str, drivers)):>16}{'/'.join(map(str, conns)):>20}"
        )
    print(f"\npooled / new driver per task: {speedup:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
