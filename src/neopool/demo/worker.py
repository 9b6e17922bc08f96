"""The demo's Celery worker: a real ``celery worker`` child process, stopped warmly."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from neopool.config import Neo4jConnectionConfig
from neopool.demo.app import WORKER_ENV
from neopool.testing.worker_process import CeleryWorkerProcess, WorkerError


class DemoWorker(CeleryWorkerProcess):
    """``python -m celery -A neopool.demo.app worker --pool=prefork -c N`` as a child.

    It runs in its own session, so a Ctrl-C in the terminal reaches the demo
    only, and the demo stops the worker itself: SIGTERM (warm shutdown: running
    tasks finish, pools close), then SIGKILL of the whole group if that hangs.
    """

    def __init__(
        self, app: Any, config: Neo4jConnectionConfig, *, concurrency: int, queue: str
    ) -> None:
        super().__init__(
            app,
            config,
            pool="prefork",
            concurrency=concurrency,
            queue=queue,
            name=f"{queue}-{os.getpid()}",
            loglevel="WARNING",
            env={WORKER_ENV: "1"},
            app_module="neopool.demo.app",
        )

    def end(self) -> None:
        """Stop warmly (a worker killed already is fine here), kill what is left, drop the log."""
        with contextlib.suppress(WorkerError):  # it was killed; the demo goes on stopping
            self.stop(timeout=10.0)
        self.kill()
        self.log_path.unlink(missing_ok=True)
