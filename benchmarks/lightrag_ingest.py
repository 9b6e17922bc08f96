"""LightRAG ingestion on Celery with a fake LLM: documents per minute in each worker mode.

Each task ingests one document with a LightRAG of its own
(``graph_storage="PooledNeo4JStorage"``, a workspace per document) whose LLM
answers every call after ``--llm-delay`` seconds (200 ms by default: a fast
model; real ones are slower, which only widens the gaps). Ingestion is
LLM-bound, so what decides throughput is how many documents a worker keeps in
flight. The workers of every mode run at once on the same cores:

* ``prefork -c 2``: two processes, one loop each, one document at a time each;
* ``threads -c 8``, a loop per thread: LightRAG's process-wide asyncio locks
  bind to the first loop that waits on them, so documents on the other loops fail;
* ``threads -c N``, process loop: N documents in flight on one loop and one driver;
* ``--workers`` such workers on the same queue (prefork's process count by
  default): as many processes as prefork's, each with one loop and one driver.
  The issue's target is judged on this one, like for like: one process runs
  Python on one core at a time, and prefork ``-c 2`` has two.

Modes take turns in rounds (order rotating); reports documents/min, p50 and
p99 latency per document, Bolt sockets per worker process at rest and at peak,
drivers, errors and the first error; checks the issue's target; writes
results/lightrag_ingest.json.

    python benchmarks/lightrag_ingest.py [--docs 96] [--llm-delay 0.2] [--in-flight 32]
"""

from __future__ import annotations

from typing import Any

from common import network_label, parser, save
from neopool.demo.app import LIGHTRAG_TASK, LLM_DELAY_ENV
from worker_modes import (
    PREFORK,
    PROCESS,
    PROCESSES,
    add_worker_options,
    columns,
    compare,
    parse_worker_args,
    report,
    rows,
    worker_modes,
)


def main() -> None:
    cli = parser(__doc__ or "")
    cli.set_defaults(rtt_ms=[0.0])
    cli.add_argument("--docs", type=int, default=None, help="documents per mode (default 96)")
    cli.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 2)")
    cli.add_argument("--llm-delay", type=float, default=0.2, help="seconds per LLM call")
    add_worker_options(cli, in_flight=32, per_thread=8)
    args = parse_worker_args(cli)
    docs = args.docs or (24 if args.quick else 96)
    rounds = args.rounds or (1 if args.quick else 2)
    results: dict[str, Any] = {"llm_delay_s": args.llm_delay, "networks": {}}
    for rtt in args.rtt_ms:
        label = network_label(rtt)
        measured = compare(
            worker_modes(LIGHTRAG_TASK, args),
            tasks=docs,
            rounds=rounds,
            rtt_ms=rtt,
            warmup=max(args.in_flight, docs // 12),  # every slot workspace prepared first
            name="lightrag_ingest",
            worker_env={LLM_DELAY_ENV: str(args.llm_delay)},
        )
        figures = measured["modes"]
        for m in figures.values():
            m["docs_per_min"] = round(60 * m["tasks_per_s"], 1)
        prefork = figures[PREFORK]["docs_per_min"] or float("nan")
        one = figures[PROCESS]["docs_per_min"] / prefork
        checked: list[list[Any]] = []
        if PROCESSES in figures:
            # Judged like for like: as many worker processes as prefork's, each
            # with one process loop and one driver.
            several = figures[PROCESSES]
            ratio = several["docs_per_min"] / prefork
            checked += [
                [
                    f"process loop, {args.workers} processes: >= 4x prefork -c "
                    f"{args.processes} docs/min",
                    f"{ratio:.2f}x",
                    ratio >= 4,
                ],
                [
                    f"process loop, {args.workers} processes: 0 errors",
                    several["errors"],
                    several["errors"] == 0,
                ],
                [
                    f"process loop, {args.workers} processes: one driver per process",
                    several["drivers_created"],
                    several["drivers_created"] == args.workers,
                ],
            ]
        checked += [
            ["process loop, one process, vs prefork", f"{one:.2f}x", None],
            [
                "process loop, one process: 0 errors",
                figures[PROCESS]["errors"],
                figures[PROCESS]["errors"] == 0,
            ],
            [
                "process loop, one process: one driver",
                figures[PROCESS]["drivers_created"],
                figures[PROCESS]["drivers_created"] == 1,
            ],
        ]
        results["networks"][label] = report(
            measured,
            checked,
            f"LightRAG ingestion, fake LLM {args.llm_delay * 1000:g} ms per call, {label}: "
            f"{docs} documents per mode in {rounds} alternating rounds",
            columns("docs/min", "s"),
            rows(figures, per_minute=True),
        )
    save("lightrag_ingest", results, args.json)


if __name__ == "__main__":
    main()
