"""LightRAG ingestion in a real Celery prefork worker: a LightRAG per task, one workspace.

Three worker processes ingest documents that share entities into one workspace
at once, each task as a LightRAG user writes it (build, ``initialize_storages``,
``ainsert``, ``finalize_storages`` in ``finally``) on the worker's persistent
loop (:class:`~neopool.celery.AsyncTask`). LightRAG's locks do not span
processes; the uniqueness constraint and the retried ``MERGE`` keep each entity
one node. The Bolt server is behind a counting proxy.
"""

from __future__ import annotations

import collections
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("lightrag", reason="needs lightrag-hku (pip install 'neopool[lightrag]')")
pytest.importorskip("celery", reason="needs the 'celery' extra")

from neo4j import GraphDatabase

from neopool.celery import cluster_stats
from neopool.config import Neo4jConnectionConfig
from neopool.database import quote_identifier
from neopool.testing import BoltTarget, TcpProxy
from neopool.testing.lightrag_app import WORKDIR_ENV, documents, make_lightrag_app
from neopool.testing.worker_process import CeleryWorkerProcess

pytestmark = [pytest.mark.lightrag, pytest.mark.celery, pytest.mark.timeout(240)]

CHILDREN = 3
DOCUMENTS = 36
#: Tasks a loop may hold between calls: none is left by a call; the pool's own are idle.
STRAY_TASKS_BOUND = 2


@contextlib.contextmanager
def lightrag_worker(
    broker_url: str,
    config: Neo4jConnectionConfig,
    workdir: Path,
    pool: str,
    concurrency: int,
    env: dict[str, str] | None = None,
) -> Iterator[CeleryWorkerProcess]:
    """A started LightRAG worker on a queue of its own (its client app is ``.app``); ended after."""
    queue = f"neopool-lightrag-{uuid.uuid4().hex[:8]}"
    app = make_lightrag_app(broker_url, queue=queue, main=queue)
    process = CeleryWorkerProcess(
        app,
        config,
        pool=pool,
        concurrency=concurrency,
        queue=queue,
        app_module="neopool.testing.lightrag_worker",
        env={WORKDIR_ENV: str(workdir), **(env or {})},
    )
    process.start()
    try:
        yield process
    finally:
        process.end()


@pytest.fixture
def worker(
    neopool_broker_url: str, worker_config: Neo4jConnectionConfig, tmp_path: Path
) -> Iterator[CeleryWorkerProcess]:
    with lightrag_worker(neopool_broker_url, worker_config, tmp_path, "prefork", CHILDREN) as w:
        yield w


def entity_counts(bolt: BoltTarget, database: str | None, workspace: str) -> tuple[int, int]:
    """``(nodes, distinct entity_ids)`` of the workspace."""
    label = quote_identifier(workspace)
    with GraphDatabase.driver(bolt.uri, auth=(bolt.username, bolt.password)) as driver:
        records, _, _ = driver.execute_query(
            f"MATCH (n:{label}) RETURN count(n) AS nodes, count(DISTINCT n.entity_id) AS ids",
            database_=database,
        )
    return int(records[0]["nodes"]), int(records[0]["ids"])


def test_prefork_children_ingest_shared_entities_without_duplicates_or_strays(
    worker: CeleryWorkerProcess, neopool_bolt: BoltTarget, bolt_proxy: TcpProxy
) -> None:
    workspace = f"celery-lightrag-{uuid.uuid4().hex[:8]}"
    docs = documents(DOCUMENTS)
    results = [
        worker.app.send_task("neopool.testing.lightrag_ingest", args=[workspace, doc_id, text])
        for doc_id, text in docs
    ]
    outcomes = [result.get(timeout=180) for result in results]  # raises on any task error

    pids = {o["pid"] for o in outcomes}
    assert len(pids) == CHILDREN, f"every child took tasks: {collections.Counter(pids)}"
    strays = collections.defaultdict(list)
    for outcome in outcomes:
        strays[outcome["pid"]].append(outcome["stray_tasks_before"])
    print(
        "asyncio tasks alive on each worker loop when a task started (max, per child):",
        {pid: max(counts) for pid, counts in strays.items()},
    )
    assert max(max(counts) for counts in strays.values()) <= STRAY_TASKS_BOUND, dict(strays)

    nodes, ids = entity_counts(neopool_bolt, "neo4j", workspace)
    assert ids >= 20  # the documents' entities
    assert nodes == ids, f"{nodes - ids} duplicate entity nodes"

    stats = cluster_stats(worker.app)[worker.nodename]
    loops = {pid: loop_stats for pid, loop_stats in stats.items() if loop_stats}
    assert {int(pid) for pid in loops} == pids
    for pid, per_loop in loops.items():
        assert len(per_loop) == 1, (pid, per_loop)  # one loop per child ...
        (figures,) = per_loop.values()
        assert figures["drivers_created"] == 1, (pid, figures)  # ... and one driver
        assert figures["in_use"] == 0, (pid, figures)
    # Each child's driver keeps a few sockets; per task it would be one or more each.
    print(f"Bolt connections opened for {DOCUMENTS} tasks: {bolt_proxy.connections_opened}")
    assert bolt_proxy.connections_opened <= 6 * CHILDREN
    assert worker.stop() == 0
    log = worker.log()
    assert "never returned" not in log
    assert "still in use" not in log
    assert "garbage-collected" not in log
    assert "entity_id is not unique" not in log
    assert "refused a uniqueness constraint" not in log


def test_threads_pool_on_defaults_ingests_on_one_loop_with_one_driver(
    neopool_broker_url: str,
    worker_config: Neo4jConnectionConfig,
    neopool_bolt: BoltTarget,
    tmp_path: Path,
) -> None:
    """``setup(app)`` as written first, under ``--pool=threads``: LightRAG's state is the
    process's, so the worker picks the process loop itself and says so once at start."""
    with lightrag_worker(
        neopool_broker_url,
        worker_config,
        tmp_path,
        "threads",
        4,
        env={"NEOPOOL_CELERY_LOOP": ""},  # the default
    ) as worker:
        app = worker.app
        workspace = f"celery-lightrag-{uuid.uuid4().hex[:8]}"
        results = [
            app.send_task("neopool.testing.lightrag_ingest", args=[workspace, doc_id, text])
            for doc_id, text in documents(12)
        ]
        outcomes = [result.get(timeout=180) for result in results]  # raises on any task error
        assert {o["pid"] for o in outcomes} == {worker.pid}
        assert len({o["loop"] for o in outcomes}) == 1

        nodes, ids = entity_counts(neopool_bolt, "neo4j", workspace)
        assert ids >= 10
        assert nodes == ids, f"{nodes - ids} duplicate entity nodes"

        ((loops),) = cluster_stats(app)[worker.nodename].values()
        ((figures),) = loops.values()  # one loop in the process ...
        assert figures["drivers_created"] == 1  # ... and one driver
        assert figures["thread"] == "neopool-process-loop"
        assert worker.stop() == 0
        log = worker.log()
        assert log.count("loop mode 'process' (chosen: --pool=threads with LightRAG loaded") == 1
        assert "bound to a different event loop" not in log
        assert "attached to a different loop" not in log
