"""LightRAG per task: PooledNeo4JStorage against stock Neo4JStorage, and the loop it leaves.

Three parts, each on a real Bolt server (embedded ArcadeDB, or ``NEO4J_URI``):

``init``
    A LightRAG per task, as a Celery task builds it: ``initialize_storages``
    time and Bolt connections opened per task, pooled (``neopool.run``, the
    persistent loop) against stock (``asyncio.run`` per task, a driver per
    instance), on loopback and at 2 ms RTT. The tasks run in a child process;
    the counting, delaying proxy (``TcpProxy``) runs in this one.
``celery``
    Documents per minute through a real prefork worker (3 children), a
    LightRAG per task, documents sharing entities, into one workspace per mode:
    pooled (``AsyncTask``) against stock (``asyncio.run`` in a sync task); and
    the duplicate entity nodes each mode left (stock has only a plain index).
``loop``
    300 LightRAG tasks (``ainsert``) in one process: asyncio tasks still alive on
    the loop afterwards and RSS growth, on the persistent loop (each call cleans
    up after itself), on the persistent loop without that clean-up (every call
    inside ``neopool.runner.detached()``: how it was before), and with
    ``asyncio.run`` per task.

    python benchmarks/lightrag_tasks.py [--quick] [--parts init celery loop]

Prints a table per part and writes results/lightrag_tasks.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import Target, bolt_target, parser, save, table
from neopool.demo.report import percentile

# -- the child: the measured work, away from the proxy's GIL --------------------------------


def _environment(target: Target, uri: str) -> None:
    """What stock Neo4JStorage reads (PooledNeo4JStorage reads the same, via lightrag_config)."""
    os.environ.update(
        NEO4J_URI=uri,
        NEO4J_USERNAME=target.username,
        NEO4J_PASSWORD=target.password,
        NEO4J_DATABASE=target.database,  # stock cannot find ArcadeDB's default by itself
    )


def child_init(storage: str, tasks: int, workdir: str) -> dict[str, Any]:
    """``tasks`` tasks, each: a LightRAG, initialize_storages, one write, finalize_storages."""
    import neopool
    from neopool.testing.lightrag_app import make_rag

    workspace = f"bench-init-{uuid.uuid4().hex[:6]}"

    async def task(i: int) -> float:
        rag = make_rag(workdir, workspace, storage)
        started = time.perf_counter()
        await rag.initialize_storages()
        elapsed = time.perf_counter() - started
        try:
            graph = rag.chunk_entity_relation_graph
            await graph.upsert_node(f"e{i}", {"entity_id": f"e{i}", "entity_type": "x"})
        finally:
            await rag.finalize_storages()
        return elapsed * 1000

    run = neopool.run if storage == "PooledNeo4JStorage" else asyncio.run
    times = [run(task(i)) for i in range(tasks)]
    neopool.runner.close_thread_loop()
    return {"initialize_ms": times}


def child_loop(mode: str, tasks: int, workdir: str) -> dict[str, Any]:
    """``tasks`` ingestion tasks; stray tasks and RSS along the way."""
    import neopool
    from neopool.testing.lightrag_app import _rss_kib, documents, make_rag

    workspace = f"bench-loop-{uuid.uuid4().hex[:6]}"
    docs = documents(tasks)

    async def task(doc_id: str, text: str) -> None:
        rag = make_rag(workdir, workspace, "PooledNeo4JStorage")
        await rag.initialize_storages()
        try:
            await rag.ainsert(text, ids=doc_id)
        finally:
            await rag.finalize_storages()

    async def without_cleanup(doc_id: str, text: str) -> None:
        with neopool.runner.detached():  # what the call spawns stays on the loop
            await asyncio.ensure_future(task(doc_id, text))

    async def alive() -> int:
        return len(asyncio.all_tasks()) - 1

    samples = []
    started = time.perf_counter()
    for i, (doc_id, text) in enumerate(docs, 1):
        if mode == "asyncio.run":
            asyncio.run(task(doc_id, text))
            stray = 0  # the loop, and everything on it, is gone
        elif mode == "persistent loop":
            neopool.run(task(doc_id, text))
            stray = neopool.run(alive())
        else:
            neopool.run(without_cleanup(doc_id, text))
            stray = neopool.run(alive())
        if i in (1, 10, 30, 100, 200, tasks) or i % 50 == 0:
            samples.append({"tasks": i, "stray_asyncio_tasks": stray, "rss_kib": _rss_kib()})
    seconds = time.perf_counter() - started
    neopool.runner.close_thread_loop()
    return {"samples": samples, "seconds": round(seconds, 2)}


def child_main(argv: list[str]) -> None:
    cli = argparse.ArgumentParser()
    cli.add_argument("part", choices=["init", "loop"])
    cli.add_argument("variant")
    cli.add_argument("--tasks", type=int, required=True)
    cli.add_argument("--uri", required=True)
    cli.add_argument("--target", required=True, help="JSON: username, password, database")
    args = cli.parse_args(argv)
    import logging

    logging.disable(logging.ERROR)  # LightRAG's per-task noise (ArcadeDB has no full-text index)
    known = json.loads(args.target)
    _environment(
        Target(args.uri, known["username"], known["password"], known["database"]), args.uri
    )
    with tempfile.TemporaryDirectory(prefix="neopool-bench-lightrag-") as workdir:
        if args.part == "init":
            result = child_init(args.variant, args.tasks, workdir)
        else:
            result = child_loop(args.variant, args.tasks, workdir)
    print("RESULT " + json.dumps(result))


def run_child(part: str, variant: str, tasks: int, target: Target, uri: str) -> dict[str, Any]:
    known = {"username": target.username, "password": target.password, "database": target.database}
    command = [sys.executable, __file__, "--child", part, variant, "--tasks", str(tasks),
               "--uri", uri, "--target", json.dumps(known)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise RuntimeError(f"{part}/{variant} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


# -- the parts -----------------------------------------------------------------------------


def part_init(target: Target, tasks: int, rtts: list[float]) -> list[dict[str, Any]]:
    from urllib.parse import urlsplit

    from neopool.testing import TcpProxy

    address = urlsplit(target.uri)
    rows = []
    with TcpProxy(address.hostname or "127.0.0.1", address.port or 7687) as proxy:
        for rtt in rtts:
            proxy.set_latency(rtt)
            for storage in ("PooledNeo4JStorage", "Neo4JStorage"):
                opened = proxy.connections_opened
                result = run_child("init", storage, tasks, target, proxy.uri("bolt"))
                times = result["initialize_ms"]
                rows.append(
                    {
                        "rtt_ms": rtt,
                        "storage": storage,
                        "runner": "neopool.run" if storage.startswith("Pooled") else "asyncio.run",
                        "tasks": tasks,
                        "initialize_ms_first": round(times[0], 2),
                        "initialize_ms_median": round(statistics.median(times[1:]), 2),
                        "initialize_ms_p95": round(percentile(times[1:], 0.95), 2),
                        "bolt_connections_per_task": round(
                            (proxy.connections_opened - opened) / tasks, 2
                        ),
                    }
                )
    table(
        f"initialize_storages per task ({tasks} tasks, a LightRAG each)",
        ["RTT", "storage", "first ms", "median ms", "p95 ms", "Bolt conns/task"],
        [
            [f"{r['rtt_ms']:g} ms", r["storage"], r["initialize_ms_first"],
             r["initialize_ms_median"], r["initialize_ms_p95"], r["bolt_connections_per_task"]]
            for r in rows
        ],
    )  # fmt: skip
    return rows


def duplicates(target: Target, workspace: str) -> tuple[int, int]:
    from neo4j import GraphDatabase

    from neopool.database import quote_identifier

    label = quote_identifier(workspace)
    with GraphDatabase.driver(target.uri, auth=target.auth()) as driver:
        records, _, _ = driver.execute_query(
            f"MATCH (n:{label}) RETURN count(n) AS nodes, count(DISTINCT n.entity_id) AS ids",
            database_=target.database,
        )
    nodes, ids = int(records[0]["nodes"]), int(records[0]["ids"])
    return nodes - ids, ids


def part_celery(
    target: Target, docs: int, rounds: int, children: int, rtts: list[float]
) -> list[dict[str, Any]]:
    from urllib.parse import urlsplit

    from neopool.config import Neo4jConnectionConfig
    from neopool.embedded.valkey import BrokerServer
    from neopool.testing import TcpProxy
    from neopool.testing.lightrag_app import WORKDIR_ENV, documents, make_lightrag_app
    from neopool.testing.worker_process import CeleryWorkerProcess

    modes = {
        "PooledNeo4JStorage": ("neopool.testing.lightrag_ingest", "AsyncTask (persistent loop)"),
        "Neo4JStorage": ("neopool.testing.lightrag_ingest_asyncio_run", "asyncio.run per task"),
    }
    address = urlsplit(target.uri)
    rows = []
    with (
        BrokerServer() as broker,
        tempfile.TemporaryDirectory() as workdir,
        TcpProxy(address.hostname or "127.0.0.1", address.port or 7687) as proxy,
    ):
        for rtt in rtts:
            proxy.set_latency(rtt)
            for storage, (task, runner) in modes.items():
                queue = f"bench-lightrag-{uuid.uuid4().hex[:6]}"
                app = make_lightrag_app(broker.url, queue=queue, main=queue)
                worker = CeleryWorkerProcess(
                    app,
                    Neo4jConnectionConfig(
                        uri=proxy.uri("bolt"),
                        username=target.username,
                        password=target.password,
                        database=target.database,
                    ),
                    pool="prefork",
                    concurrency=children,
                    queue=queue,
                    loglevel="ERROR",
                    app_module="neopool.testing.lightrag_worker",
                    env={WORKDIR_ENV: workdir},
                ).start()
                retried: dict[int, int] = {}  # per worker process: writes run again so far
                try:
                    for round_no in range(rounds):
                        workspace = f"bench-celery-{storage[:6]}-{uuid.uuid4().hex[:6]}"
                        batch = documents(docs, offset=round_no * docs)
                        opened = proxy.connections_opened
                        started = time.perf_counter()
                        results = [
                            app.send_task(task, args=[workspace, doc_id, text, storage])
                            for doc_id, text in batch
                        ]
                        outcomes = [r.get(timeout=900) for r in results]
                        seconds = time.perf_counter() - started
                        extra, ids = duplicates(target, workspace)
                        before = sum(retried.values())
                        for outcome in outcomes:
                            pid = outcome["pid"]
                            retried[pid] = max(retried.get(pid, 0), outcome["lost_races"])
                        rows.append(
                            {
                                "rtt_ms": rtt,
                                "storage": storage,
                                "runner": runner,
                                "round": round_no,
                                "documents": docs,
                                "children": children,
                                "seconds": round(seconds, 2),
                                "docs_per_minute": round(docs / seconds * 60, 1),
                                "bolt_connections_per_doc": round(
                                    (proxy.connections_opened - opened) / docs, 2
                                ),
                                "entities": ids,
                                "duplicate_entity_nodes": extra,
                                "lost_races_retried": sum(retried.values()) - before,
                                "max_stray_tasks_at_task_start": max(
                                    o["stray_tasks_before"] for o in outcomes
                                ),
                            }
                        )
                finally:
                    worker.end()
    table(
        f"Celery prefork, {children} children: {docs} documents per round, shared entities",
        ["RTT", "storage", "round", "docs/min", "Bolt conns/doc", "entities", "duplicates",
         "races retried"],
        [
            [f"{r['rtt_ms']:g} ms", r["storage"], r["round"], r["docs_per_minute"],
             r["bolt_connections_per_doc"], r["entities"], r["duplicate_entity_nodes"],
             r["lost_races_retried"]]
            for r in rows
        ],
    )  # fmt: skip
    return rows


def part_loop(target: Target, tasks: int) -> list[dict[str, Any]]:
    rows = []
    for mode in ("persistent loop", "persistent loop, no clean-up (before)", "asyncio.run"):
        result = run_child("loop", mode, tasks, target, target.uri)
        samples = result["samples"]
        by_tasks = {s["tasks"]: s for s in samples}
        warm = by_tasks.get(10, samples[0])
        last = samples[-1]
        rows.append(
            {
                "mode": mode,
                "tasks": tasks,
                "seconds": result["seconds"],
                "stray_asyncio_tasks_after": last["stray_asyncio_tasks"],
                "stray_asyncio_tasks_after_30": by_tasks.get(30, last)["stray_asyncio_tasks"],
                "rss_mib_after_10": round(warm["rss_kib"] / 1024, 1),
                "rss_mib_after": round(last["rss_kib"] / 1024, 1),
                "rss_growth_mib_10_to_end": round((last["rss_kib"] - warm["rss_kib"]) / 1024, 1),
                "samples": samples,
            }
        )
    table(
        f"{tasks} LightRAG tasks in one process",
        ["mode", "s", "stray tasks after 30", "stray tasks after all", "RSS MiB", "RSS growth MiB"],
        [
            [r["mode"], r["seconds"], r["stray_asyncio_tasks_after_30"],
             r["stray_asyncio_tasks_after"], r["rss_mib_after"], r["rss_growth_mib_10_to_end"]]
            for r in rows
        ],
    )  # fmt: skip
    return rows


def main() -> None:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--parts", nargs="+", choices=["init", "celery", "loop"],
                     default=["init", "celery", "loop"])  # fmt: skip
    cli.add_argument("--tasks", type=int, default=None, help="tasks of the init part (30)")
    cli.add_argument("--docs", type=int, default=None, help="documents per Celery round (60)")
    cli.add_argument("--rounds", type=int, default=None, help="Celery rounds per mode (2)")
    cli.add_argument("--loop-tasks", type=int, default=None, help="tasks of the loop part (300)")
    cli.add_argument("--children", type=int, default=3)
    args = cli.parse_args()
    quick = args.quick
    tasks = args.tasks or (8 if quick else 30)
    docs = args.docs or (12 if quick else 60)
    rounds = args.rounds or (1 if quick else 2)
    loop_tasks = args.loop_tasks or (30 if quick else 300)
    results: dict[str, Any] = {"quick": quick}
    previous = args.json or Path("results/lightrag_tasks.json")
    if set(args.parts) != {"init", "celery", "loop"} and previous.exists():
        # A run of some parts keeps the other parts' figures of the last run.
        kept = json.loads(previous.read_text())
        results.update({k: kept[k] for k in ("init", "celery", "loop") if k in kept})
    with bolt_target() as target:
        if "init" in args.parts:
            results["init"] = part_init(target, tasks, list(args.rtt_ms))
        if "celery" in args.parts:
            results["celery"] = part_celery(target, docs, rounds, args.children, list(args.rtt_ms))
        if "loop" in args.parts:
            results["loop"] = part_loop(target, loop_tasks)
    save("lightrag_tasks", results, args.json)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
