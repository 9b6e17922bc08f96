"""The demo's Celery worker: a real ``celery worker`` child process, stopped warmly."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from neopool.celery.lifecycle import LOOP_ENV
from neopool.config import Neo4jConnectionConfig
from neopool.demo.app import WORKER_ENV, WorkerKind
from neopool.testing.worker_process import CeleryWorkerProcess, WorkerError


class DemoWorker(CeleryWorkerProcess):
    """``python -m celery -A neopool.demo.app worker --pool=POOL -c N`` as a child.

    ``kind`` says the pool, the concurrency and the loop mode
    (``NEOPOOL_CELERY_LOOP`` in its environment, with ``env``); ``index``
    tells apart the workers of one kind that share a queue.

    It runs in its own session, so a Ctrl-C in the terminal reaches the demo
    only, and the demo stops the worker itself: SIGTERM (warm shutdown: running
    tasks finish, pools close), then SIGKILL of the whole group if that hangs.
    """

    def __init__(
        self,
        app: Any,
        config: Neo4jConnectionConfig,
        *,
        kind: WorkerKind,
        queue: str,
        env: dict[str, str] | None = None,
        loglevel: str = "WARNING",
        index: int = 0,
    ) -> None:
        super().__init__(
            app,
            config,
            pool=kind.pool,
            concurrency=kind.concurrency,
            queue=queue,
            name=f"{queue}-{os.getpid()}-{index}",
            loglevel=loglevel,
            env={**(env or {}), WORKER_ENV: "1", LOOP_ENV: kind.loop},
            app_module="neopool.demo.app",
        )
        self.kind = kind

    def process_ids(self) -> list[int]:
        """The worker's processes: its main process and (prefork) its children (Linux)."""
        pid = self.pid
        if pid is None:
            return []
        children: list[int] = []
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as listed:
                    children += [int(child) for child in listed.read().split()]
        return [pid, *children]

    def end(self) -> None:
        """Stop warmly (a worker killed already is fine here), kill what is left, drop the log."""
        with contextlib.suppress(WorkerError):  # it was killed; the demo goes on stopping
            self.stop(timeout=10.0)
        self.kill()
        self.log_path.unlink(missing_ok=True)
