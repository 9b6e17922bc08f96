"""The demo's Celery app: ``python -m celery -A neopool.demo.app worker``.

Configured from the environment the demo gives its worker: the broker in
``NEOPOOL_CELERY_BROKER_URL``, the queue in ``NEOPOOL_CELERY_QUEUE``, the Bolt
server in ``NEO4J_*``, the loop mode in ``NEOPOOL_CELERY_LOOP``. One task per
mode; each returns its duration and the worker process's connection and
driver counters (see :mod:`.instrument`). A mode is a task run by a kind of
worker (:class:`WorkerKind`): the process-loop mode runs the persistent-runner
task on a threads-pool worker in process-loop mode.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from neopool.celery import AsyncTask
from neopool.demo import instrument
from neopool.demo.workload import (
    IdealLoop,
    ingest_borrowed,
    ingest_new_driver,
    timed,
    timed_async,
)
from neopool.testing.celery_app import BROKER_ENV, QUEUE_ENV, make_app

#: Celery task name of each mode run by the prefork worker, in the order the demo runs them.
MODE_TASKS = {
    "new driver per task": "neopool.demo.new_driver",
    "neopool + asyncio.run per task": "neopool.demo.asyncio_run",
    "neopool + persistent runner": "neopool.demo.runner",
    "ideal (one driver, one loop per process)": "neopool.demo.ideal",
}
#: The process-loop mode: the persistent-runner task on a threads worker in process-loop mode.
PROCESS_LOOP_MODE = "neopool + process loop (threads pool)"
#: Task name of every mode the demo knows.
TASKS = {**MODE_TASKS, PROCESS_LOOP_MODE: MODE_TASKS["neopool + persistent runner"]}
#: LightRAG ingestion with a fake LLM (its delay from ``NEOPOOL_DEMO_LLM_DELAY``, seconds).
LIGHTRAG_TASK = "neopool.demo.lightrag"
LLM_DELAY_ENV = "NEOPOOL_DEMO_LLM_DELAY"
DEFAULT_QUEUE = "neopool-demo"


@dataclass(frozen=True)
class WorkerKind:
    """A Celery worker configuration: pool, concurrency, loop mode, and how many such
    workers (each a process of its own, or a prefork parent) share its queue."""

    pool: str = "prefork"
    concurrency: int = 2
    loop: str = "thread"
    workers: int = 1

    def describe(self) -> str:
        """``prefork -c 2, a loop per process``, ``2 x threads -c 8, process loop``..."""
        loops = {"thread": "a loop per thread", "process": "process loop"}
        if self.pool == "prefork":
            loops["thread"] = "a loop per process"
        times = f"{self.workers} x " if self.workers > 1 else ""
        return f"{times}{self.pool} -c {self.concurrency}, {loops[self.loop]}"


def build_app(broker_url: str, queue: str = DEFAULT_QUEUE) -> Any:
    """The app, for the worker and for the demo process that sends to it."""
    app = make_app(broker_url, queue=queue, main="neopool_demo")

    @app.task(name=MODE_TASKS["new driver per task"])  # type: ignore[untyped-decorator]
    def new_driver(workspace: str, doc_id: str) -> dict[str, Any]:
        return timed(lambda: asyncio.run(ingest_new_driver(workspace, doc_id)))

    @app.task(name=MODE_TASKS["neopool + asyncio.run per task"])  # type: ignore[untyped-decorator]
    def asyncio_run(workspace: str, doc_id: str) -> dict[str, Any]:
        return timed(lambda: asyncio.run(ingest_borrowed(workspace, doc_id)))

    @app.task(name=MODE_TASKS["neopool + persistent runner"], base=AsyncTask)  # type: ignore[untyped-decorator]
    async def runner(workspace: str, doc_id: str) -> dict[str, Any]:
        return await timed_async(ingest_borrowed(workspace, doc_id))

    @app.task(name=MODE_TASKS["ideal (one driver, one loop per process)"])  # type: ignore[untyped-decorator]
    def ideal(workspace: str, doc_id: str) -> dict[str, Any]:
        return timed(lambda: IdealLoop.run(workspace, doc_id))

    @app.task(name=LIGHTRAG_TASK, base=AsyncTask)  # type: ignore[untyped-decorator]
    async def lightrag(workspace: str, doc_id: str) -> dict[str, Any]:
        from neopool.demo.lightrag_workload import DEFAULT_LLM_DELAY_S, ingest_in_slot

        delay = float(os.environ.get(LLM_DELAY_ENV) or DEFAULT_LLM_DELAY_S)
        return await timed_async(ingest_in_slot(doc_id, f"lr_{workspace}", delay))

    from celery.signals import worker_process_shutdown

    worker_process_shutdown.connect(lambda **_: IdealLoop.close(), weak=False)
    return app


#: Set by the demo in its worker's environment: this process is a demo worker.
WORKER_ENV = "NEOPOOL_DEMO_WORKER"

if os.environ.get(WORKER_ENV):  # imported by the demo's worker: build it from the environment
    instrument.install()
    app = build_app(os.environ[BROKER_ENV], os.environ.get(QUEUE_ENV, DEFAULT_QUEUE))
