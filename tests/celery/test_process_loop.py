"""Process-loop mode on real workers: many tasks in flight on one loop, one driver per process.

Each test starts ``celery -A process_loop_app worker --pool=threads`` (or
prefork) with ``NEOPOOL_CELERY_LOOP=process``: every task of the worker process
runs on the runner's one process loop, ``--concurrency`` of them at once.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded, TaskRevokedError
from prometheus_client import CollectorRegistry, generate_latest

from celery import Celery
from celery_helpers import graph_counts, only_worker, settled_stats
from neopool import runner
from neopool.celery import AsyncTask, cluster_stats
from neopool.metrics import cluster_source, register
from neopool.runner import PROCESS_LOOP_THREAD
from neopool.testing import BoltTarget
from neopool.testing.proxy import TcpProxy
from neopool.testing.worker_process import CeleryWorkerProcess

pytestmark = [pytest.mark.celery, pytest.mark.timeout(180)]

HERE = Path(__file__).resolve().parent
ENTITIES = 3


@pytest.fixture
def start_process_worker(
    start_worker: Callable[..., CeleryWorkerProcess],
) -> Callable[..., CeleryWorkerProcess]:
    """Start a worker in process-loop mode (threads pool unless told), app ``process_loop_app``."""

    def start(concurrency: int, pool: str = "threads", **env: str) -> CeleryWorkerProcess:
        path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
        environment = {"NEOPOOL_CELERY_LOOP": "process", "PYTHONPATH": path, **env}
        return start_worker(pool, concurrency, env=environment, app_module="process_loop_app")

    return start


def started(app: Any, key: str, count: int, timeout: float = 60.0) -> list[int]:
    """Block until ``count`` tasks pushed their pid to ``key`` (a real event, no polling)."""
    client = redis.Redis.from_url(app.conf.broker_url)
    pids = []
    for _ in range(count):
        popped = client.blpop([key], timeout=timeout)
        assert popped is not None, f"only {len(pids)} of {count} tasks announced themselves"
        pids.append(int(popped[1]))
    return pids


def the_process_loop(stats: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """``(pid, loop id, stats)`` of the only loop of the only process."""
    ((pid, loops),) = stats.items()
    ((loop_id, loop),) = loops.items()
    return pid, loop_id, loop


def test_tasks_in_flight_share_one_loop_one_driver_and_are_reported(
    celery_app: Any,
    start_process_worker: Callable[..., CeleryWorkerProcess],
    bolt_proxy: TcpProxy,
    neopool_bolt: BoltTarget,
    workspace: str,
) -> None:
    worker = start_process_worker(8)
    assert only_worker(cluster_stats(celery_app), worker) == {str(worker.pid): {}}

    # Eight tasks hold a lease at the same time, on one loop.
    key = f"neopool-test-started-{uuid.uuid4().hex}"
    holds = [celery_app.send_task("neopool.testing.hold", args=[2.0, key]) for _ in range(8)]
    assert set(started(celery_app, key, 8)) == {worker.pid}
    pid, loop_id, during = the_process_loop(only_worker(cluster_stats(celery_app), worker))
    assert pid == str(worker.pid)
    assert during["thread"] == PROCESS_LOOP_THREAD
    assert during["in_use"] == 8
    assert during["drivers_created"] == 1
    # Prometheus reports it too (from the same published figures), labelled with its thread.
    metrics = CollectorRegistry()
    register(metrics, source=cluster_source(celery_app))
    text = generate_latest(metrics).decode()
    assert f'thread="{PROCESS_LOOP_THREAD}"' in text
    assert f'loop="{loop_id}"' in text
    held = [h.get(timeout=60) for h in holds]
    assert {(h["loop"], h["thread"]) for h in held} == {(loop_id, PROCESS_LOOP_THREAD)}

    # Async and sync tasks (neopool.run) alike run on it.
    sends = [
        celery_app.send_task("neopool.testing.ingest", args=[workspace, f"doc-{i}", ENTITIES])
        for i in range(60)
    ]
    syncs = [celery_app.send_task("neopool.testing.where_sync") for _ in range(8)]
    outcomes = [s.get(timeout=120) for s in sends]
    sync_outcomes = [s.get(timeout=60) for s in syncs]
    assert {o["loop"] for o in outcomes + sync_outcomes} == {loop_id}
    assert {o["thread"] for o in outcomes + sync_outcomes} == {PROCESS_LOOP_THREAD}
    assert all(o["caller_thread"] != PROCESS_LOOP_THREAD for o in sync_outcomes)

    stats = settled_stats(celery_app, worker, 8 + 60 + 8)
    _, same_loop, after = the_process_loop(stats)
    assert same_loop == loop_id
    assert after["drivers_created"] == 1
    assert after["borrows"] == 8 + 60 + 8
    assert after["in_use"] == 0
    # One driver: it opened no more sockets than leases in use at once, plus the warm ones.
    assert bolt_proxy.connections_opened <= after["max_size"] + after["min_size"]
    assert graph_counts(neopool_bolt.config(), outcomes[0]["database"], workspace) == (
        60 * ENTITIES,
        60 * (ENTITIES - 1),
    )

    assert worker.stop() == 0
    log = worker.log()
    assert f" {worker.pid} shut down: closed 1 event loop(s); 0 pool(s) left open" in log, (
        worker.log_tail()
    )
    assert "never returned" not in log
    assert "still in use" not in log
    assert bolt_proxy.active_connections == 0


def test_borrowers_beyond_pool_max_size_wait_first_in_first_out(
    celery_app: Any, start_process_worker: Callable[..., CeleryWorkerProcess]
) -> None:
    worker = start_process_worker(8, NEOPOOL_POOL_MAX_SIZE="2", NEOPOOL_POOL_MIN_SIZE="1")
    sent = [celery_app.send_task("neopool.testing.borrow_in_line", args=[0.3]) for _ in range(8)]
    results = sorted((r.get(timeout=60) for r in sent), key=lambda r: r["want"])
    assert len({r["loop"] for r in results}) == 1
    got = [r["got"] for r in results]
    assert got == sorted(got), "leases were not handed out in the order they were asked for"
    waited = [r["got"] - r["want"] for r in results]
    assert sum(w > 0.2 for w in waited) >= 4  # most of them queued behind the two leases
    (_, _, stats) = the_process_loop(settled_stats(celery_app, worker, 8))
    assert stats["max_size"] == 2
    assert stats["borrows"] == 8
    assert stats["timeouts"] == 0
    assert stats["max_wait_ms"] > 200


def test_soft_time_limit_and_revoke_cancel_only_that_task_and_return_its_lease(
    celery_app: Any, start_process_worker: Callable[..., CeleryWorkerProcess]
) -> None:
    worker = start_process_worker(4)
    key = f"neopool-test-started-{uuid.uuid4().hex}"

    limited = celery_app.send_task(
        "neopool.testing.hold", args=[60.0, key], soft_time_limit=1, time_limit=30
    )
    others = [celery_app.send_task("neopool.testing.hold", args=[2.5, key]) for _ in range(2)]
    started(celery_app, key, 3)
    with pytest.raises(SoftTimeLimitExceeded):
        limited.get(timeout=30, propagate=True)
    assert all(o.get(timeout=30)["thread"] == PROCESS_LOOP_THREAD for o in others)

    revoked = celery_app.send_task("neopool.testing.hold", args=[60.0, key])
    others = [celery_app.send_task("neopool.testing.hold", args=[2.5, key]) for _ in range(2)]
    started(celery_app, key, 3)
    celery_app.control.revoke(revoked.id, destination=[worker.nodename])
    with pytest.raises(TaskRevokedError):
        revoked.get(timeout=30, propagate=True)
    assert all(o.get(timeout=30)["thread"] == PROCESS_LOOP_THREAD for o in others)

    (_, _, stats) = the_process_loop(settled_stats(celery_app, worker, 6))
    assert stats["in_use"] == 0
    assert stats["borrows"] == 6
    assert stats["drivers_created"] == 1


def test_what_a_task_leaves_running_is_cancelled_when_it_ends_and_only_that(
    celery_app: Any, start_process_worker: Callable[..., CeleryWorkerProcess]
) -> None:
    worker = start_process_worker(4)
    key = f"neopool-test-started-{uuid.uuid4().hex}"
    left = f"neopool-test-left-{uuid.uuid4().hex}"
    running = celery_app.send_task("neopool.testing.hold", args=[3.0, key])
    started(celery_app, key, 1)
    leaver = celery_app.send_task("neopool.testing.leave_behind", args=[left])
    assert leaver.get(timeout=30)["thread"] == PROCESS_LOOP_THREAD
    client = redis.Redis.from_url(celery_app.conf.broker_url)
    assert client.blpop([left], timeout=10) is not None  # its background task was cancelled
    assert running.get(timeout=30)["thread"] == PROCESS_LOOP_THREAD  # the other one was not
    (_, _, stats) = the_process_loop(settled_stats(celery_app, worker, 2))
    assert stats["in_use"] == 0


def test_a_bound_task_sees_its_own_request_among_many_on_the_loop(
    celery_app: Any, start_process_worker: Callable[..., CeleryWorkerProcess]
) -> None:
    worker = start_process_worker(8)
    sent = [celery_app.send_task("neopool.testing.own_request", args=[1.0]) for _ in range(8)]
    outcomes = [s.get(timeout=60) for s in sent]
    assert max(o["began"] for o in outcomes) < min(o["ended"] for o in outcomes)  # all at once
    assert {(o["loop"], o["thread"]) for o in outcomes} == {
        (outcomes[0]["loop"], PROCESS_LOOP_THREAD)
    }
    ids = [s.id for s in sent]
    assert [o["first"] for o in outcomes] == ids
    assert [o["id"] for o in outcomes] == ids  # its own still, after the others ran
    assert [o["spawned"] for o in outcomes] == ids  # what it spawned sees it too
    assert {o["retries"] for o in outcomes} == {0}
    assert {o["hostname"] for o in outcomes} == {worker.nodename}


def test_a_task_detached_from_a_bound_call_does_not_keep_its_request(
    neopool_registry: Any,
) -> None:
    """Run in this process (``apply``): a task spawned under ``runner.detached()``
    sees the call's request while the call runs; once it has ended, none (not the
    next call's, which Celery's thread-local then holds)."""
    app = Celery("detached-request", set_as_current=False)
    seen: dict[str, Any] = {}
    ended = asyncio.Event()  # on this thread's loop, which outlives the call

    @app.task(bind=True, base=AsyncTask, shared=False)  # type: ignore[untyped-decorator]
    async def spawn_then_wake(self: Any, role: str) -> None:
        if role == "wake":
            ended.set()
            await seen["kept"]
            return

        async def kept() -> None:
            seen["during"] = self.request.id
            await ended.wait()
            seen["after"] = self.request.id

        with runner.detached():
            seen["kept"] = asyncio.get_running_loop().create_task(kept())
        await asyncio.sleep(0)  # the kept task starts while the call runs

    try:
        spawn_then_wake.apply(args=["spawn"], task_id="the-first-call").get()
        assert seen["during"] == "the-first-call"
        spawn_then_wake.apply(args=["wake"], task_id="the-next-call").get()
        assert seen["after"] is None
    finally:
        runner.close_thread_loop()


def test_a_revocation_poll_that_would_spin_is_refused_when_the_task_is_made() -> None:
    app = Celery("poll", set_as_current=False)
    for poll in (0, -1, math.nan):

        @app.task(base=AsyncTask, shared=False, revocation_poll=poll)  # type: ignore[untyped-decorator]
        async def spin() -> None: ...

        with pytest.raises(ValueError, match="revocation_poll must be a positive number"):
            spin.delay  # noqa: B018 - Celery makes the task class on first use

    @app.task(base=AsyncTask, shared=False, revocation_poll=math.inf)  # type: ignore[untyped-decorator]
    async def never_polls() -> None: ...

    assert never_polls.revocation_poll == math.inf


def test_a_bound_task_retries_itself_on_the_loop(
    celery_app: Any, start_process_worker: Callable[..., CeleryWorkerProcess]
) -> None:
    start_process_worker(8)
    sent = [celery_app.send_task("neopool.testing.retry_once") for _ in range(8)]
    outcomes = [s.get(timeout=60) for s in sent]
    assert {o["thread"] for o in outcomes} == {PROCESS_LOOP_THREAD}
    assert [o["id"] for o in outcomes] == [s.id for s in sent]
    assert {o["retries"] for o in outcomes} == {1}  # retried once, by the retry it asked for


def test_warm_shutdown_lets_tasks_finish_by_the_deadline_then_closes_the_loop(
    celery_app: Any,
    start_process_worker: Callable[..., CeleryWorkerProcess],
    bolt_proxy: TcpProxy,
) -> None:
    drain = 3.0
    worker = start_process_worker(6, NEOPOOL_CELERY_DRAIN_TIMEOUT=str(drain))
    key = f"neopool-test-started-{uuid.uuid4().hex}"
    short = [celery_app.send_task("neopool.testing.hold", args=[1.5, key]) for _ in range(4)]
    long = [celery_app.send_task("neopool.testing.hold", args=[60.0, key]) for _ in range(2)]
    started(celery_app, key, 6)

    began = time.monotonic()
    assert worker.stop(timeout=30) == 0
    took = time.monotonic() - began
    assert drain - 0.5 < took < drain + 5, took
    assert all(s.get(timeout=10)["thread"] == PROCESS_LOOP_THREAD for s in short)
    log = worker.log()
    assert "2 task(s) still running after 3.0 s; cancelled" in log, worker.log_tail()
    assert "closed 1 event loop(s); 0 pool(s) left open" in log, worker.log_tail()
    assert bolt_proxy.active_connections == 0
    # acks_late + reject_on_worker_lost: the two cut off went back to the queue, not failed.
    assert all(r.state == "PENDING" for r in long)
    assert redis.Redis.from_url(celery_app.conf.broker_url).llen(worker.queue) == 2


def test_a_forked_child_starts_a_process_loop_of_its_own(
    celery_app: Any, start_process_worker: Callable[..., CeleryWorkerProcess]
) -> None:
    """The worker's main process has a process loop with a warm pool when it forks."""
    worker = start_process_worker(2, pool="prefork", NEOPOOL_TEST_PARENT_LOOP="1")
    log = worker.log()
    assert "parent process loop" in log, worker.log_tail()
    parent_loop = log.split("parent process loop ", 1)[1].split()[0]
    key = f"neopool-test-started-{uuid.uuid4().hex}"
    holds = [celery_app.send_task("neopool.testing.hold", args=[1.5, key]) for _ in range(2)]
    children = set(started(celery_app, key, 2))
    outcomes = [h.get(timeout=30) for h in holds]
    assert worker.pid not in children
    assert {o["thread"] for o in outcomes} == {PROCESS_LOOP_THREAD}
    assert {o["pid"] for o in outcomes} == children  # each child ran one, on its own loop
    # (Loop ids are addresses: two children may show the same one. The parent's loop
    # object is kept alive in each child, so no new loop there can take its address.)
    assert parent_loop not in {o["loop"] for o in outcomes}
    stats = settled_stats(celery_app, worker, 3)
    assert set(stats[str(worker.pid)]) == {parent_loop}  # the parent's own, still its own
    assert set(stats) == {str(worker.pid)} | {str(pid) for pid in children}
    for pid in children:
        loops = stats[str(pid)]
        ((loop_id, loop),) = loops.items()
        assert loop_id != parent_loop
        assert loop["drivers_created"] == 1
    assert worker.stop() == 0
    assert "never returned" not in worker.log()
    assert "still in use" not in worker.log()


@pytest.mark.lightrag
def test_lightrag_ingestion_on_the_threads_pool_runs_on_one_loop_without_loop_errors(
    celery_app: Any,
    start_process_worker: Callable[..., CeleryWorkerProcess],
    neopool_bolt: BoltTarget,
) -> None:
    pytest.importorskip("lightrag", reason="needs lightrag-hku")
    from neopool.demo.lightrag_workload import ENTITIES as LR_ENTITIES
    from neopool.demo.lightrag_workload import TASK_NAME

    worker = start_process_worker(6)
    run = uuid.uuid4().hex[:6]
    sent = [
        celery_app.send_task(TASK_NAME, args=[f"doc{i}", f"lr_{run}_{i}", 0.05]) for i in range(12)
    ]
    outcomes = [s.get(timeout=120) for s in sent]
    assert len({o["loop"] for o in outcomes}) == 1
    assert {o["thread"] for o in outcomes} == {PROCESS_LOOP_THREAD}
    for outcome in outcomes[:3]:
        nodes, _ = graph_counts(neopool_bolt.config(), "neo4j", outcome["workspace"])
        assert nodes == LR_ENTITIES
    (_, _, stats) = the_process_loop(settled_stats(celery_app, worker, 12))
    assert stats["drivers_created"] == 1
    assert stats["in_use"] == 0
    assert worker.stop() == 0
    assert "bound to a different event loop" not in worker.log()
