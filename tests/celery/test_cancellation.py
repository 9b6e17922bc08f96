"""A killed child, a soft time limit, a revoked task: no lease and no write is lost."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded, TaskRevokedError

from celery_helpers import TASKS, distinct_ids, graph_counts, only_worker, settled_stats
from neopool.celery import cluster_stats
from neopool.testing import BoltTarget
from neopool.testing.worker_process import CeleryWorkerProcess

pytestmark = [pytest.mark.celery, pytest.mark.timeout(180)]

ENTITIES = 3


def broker(app: Any) -> Any:
    return redis.Redis.from_url(app.conf.broker_url)


def wait_for_pid(app: Any, key: str, timeout: float = 60.0) -> int:
    """Block until a task pushes its pid to ``key`` (a real event, no polling)."""
    popped = broker(app).blpop([key], timeout=timeout)
    assert popped is not None, f"no task announced itself on {key}"
    return int(popped[1])


def test_sigkill_of_a_prefork_child_mid_run_loses_and_duplicates_nothing(
    celery_app: Any,
    start_worker: Callable[..., CeleryWorkerProcess],
    neopool_bolt: BoltTarget,
    workspace: str,
) -> None:
    worker = start_worker("prefork", 2)
    crash_key = f"neopool-test-crash-{uuid.uuid4().hex}"
    results = []
    for i in range(TASKS):
        options = {"crash_key": crash_key} if i == 20 else {}
        results.append(
            celery_app.send_task(
                "neopool.testing.ingest", args=[workspace, f"doc-{i}", ENTITIES], kwargs=options
            )
        )
    victim = wait_for_pid(celery_app, f"{crash_key}:pid")  # it has a task, unacknowledged
    os.kill(victim, signal.SIGKILL)

    outcomes = [result.get(timeout=120) for result in results]
    assert all(o["written"] == ENTITIES for o in outcomes)
    assert outcomes[20]["pid"] != victim  # re-run (acks_late) on another process

    stats = only_worker(cluster_stats(celery_app), worker)
    assert str(victim) not in stats
    assert len(stats) == 2  # Celery replaced the child
    replacements = {pid for pid in stats if int(pid) not in {o["pid"] for o in outcomes[:20]}}
    assert replacements, stats

    # The new child works, with a pool of its own. (On a fast machine the survivor may
    # have run the whole batch alone.) Two leases held at once need both children.
    started = f"neopool-test-started-{uuid.uuid4().hex}"
    holds = [celery_app.send_task("neopool.testing.hold", args=[5.0, started]) for _ in range(2)]
    holders = {str(wait_for_pid(celery_app, started)) for _ in range(2)}
    assert holders == set(stats), (holders, stats)
    for hold in holds:
        hold.get(timeout=60)
    stats = settled_stats(celery_app, worker, 1, replacements)
    assert all(stats[pid] for pid in replacements), stats

    database = outcomes[0]["database"]
    config = neopool_bolt.config()
    assert graph_counts(config, database, workspace) == (
        TASKS * ENTITIES,
        TASKS * (ENTITIES - 1),
    )
    assert distinct_ids(config, database, workspace) == TASKS * ENTITIES


def test_soft_time_limit_cancels_the_coroutine_and_returns_its_lease(
    celery_app: Any, start_worker: Callable[..., CeleryWorkerProcess], workspace: str
) -> None:
    worker = start_worker("prefork", 1)
    started = f"neopool-test-started-{uuid.uuid4().hex}"
    held = celery_app.send_task(
        "neopool.testing.hold", args=[60.0, started], soft_time_limit=1, time_limit=30
    )
    pid = wait_for_pid(celery_app, started)
    with pytest.raises(SoftTimeLimitExceeded):
        held.get(timeout=60, propagate=True)

    (loops,) = settled_stats(celery_app, worker, 1, {str(pid)})[str(pid)].values()
    assert loops["in_use"] == 0
    assert loops["borrows"] == 1
    # The same child, the same loop and driver, carry on.
    after = celery_app.send_task("neopool.testing.ingest", args=[workspace, "after", 2])
    assert after.get(timeout=60)["pid"] == pid
    (loops,) = settled_stats(celery_app, worker, 2, {str(pid)})[str(pid)].values()
    assert loops["drivers_created"] == 1
    assert loops["borrows"] == 2


def test_a_soft_time_limit_signalled_while_the_loop_runs_a_callback_still_cuts_the_task_off(
    celery_app: Any, start_worker: Callable[..., CeleryWorkerProcess]
) -> None:
    """Prefork: Celery's signal raises wherever the child is. Landing in a plain loop
    callback (a driver decoding a large result), asyncio would log it and go on;
    AsyncTask catches it there and cuts the task off, instead of letting it run."""
    worker = start_worker("prefork", 1)
    started = f"neopool-test-started-{uuid.uuid4().hex}"
    busy = celery_app.send_task(
        "neopool.testing.hold_busy", args=[20.0, started], soft_time_limit=1, time_limit=30
    )
    pid = wait_for_pid(celery_app, started)
    began = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded):
        busy.get(timeout=60, propagate=True)
    assert time.monotonic() - began < 10  # not the 20 s it would have run
    (loops,) = settled_stats(celery_app, worker, 1, {str(pid)})[str(pid)].values()
    assert loops["in_use"] == 0


def test_a_task_that_catches_its_soft_time_limit_may_clean_up_and_return(
    celery_app: Any, start_worker: Callable[..., CeleryWorkerProcess]
) -> None:
    """Prefork: the signal raises in the task's own code, which catches it and takes
    its time to clean up (Celery's pattern); nothing of neopool's cuts that short."""
    worker = start_worker("prefork", 1)
    started = f"neopool-test-started-{uuid.uuid4().hex}"
    cleaning = celery_app.send_task(
        "neopool.testing.clean_up_on_soft_limit",
        args=[started, 2.0],
        soft_time_limit=1,
        time_limit=30,
    )
    pid = wait_for_pid(celery_app, started)
    assert cleaning.get(timeout=60)["cleaned_up"] is True
    (loops,) = settled_stats(celery_app, worker, 1, {str(pid)})[str(pid)].values()
    assert loops["in_use"] == 0


def test_revoking_a_running_task_cancels_it_and_returns_its_lease(
    celery_app: Any, start_worker: Callable[..., CeleryWorkerProcess]
) -> None:
    """Threads pool: Celery cannot signal a thread, so AsyncTask watches for the revoke.

    (The solo pool cannot hear a revoke while its only thread runs the task.)
    """
    worker = start_worker("threads", 2)
    started = f"neopool-test-started-{uuid.uuid4().hex}"
    held = celery_app.send_task("neopool.testing.hold", args=[60.0, started])
    wait_for_pid(celery_app, started)
    celery_app.control.revoke(held.id, destination=[worker.nodename])
    with pytest.raises(TaskRevokedError):
        held.get(timeout=30, propagate=True)

    (process,) = cluster_stats(celery_app)[worker.nodename].values()
    (loops,) = process.values()
    assert loops["in_use"] == 0
    assert loops["borrows"] == 1
