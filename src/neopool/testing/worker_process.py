"""A real Celery worker as a subprocess: start, wait until it answers, stop warmly.

Used by neopool's tests and benchmarks; the worker runs the app of
:mod:`neopool.testing.celery_worker` against a real broker and Bolt server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from neopool._service import Service
from neopool.config import Neo4jConnectionConfig
from neopool.errors import NeopoolError
from neopool.testing.celery_app import BROKER_ENV, QUEUE_ENV


class WorkerError(NeopoolError):
    """The worker did not start, or did not stop in time."""


class CeleryWorkerProcess(Service):
    """``python -m celery -A neopool.testing.celery_worker worker`` on its own queue.

    ``app`` is a client app on the same broker and queue (from
    :func:`neopool.testing.celery_app.make_app`); readiness is awaited with
    ``app.control.ping``, not a sleep. The worker's log is in :attr:`log_path`.
    """

    def __init__(
        self,
        app: Any,
        config: Neo4jConnectionConfig,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        queue: str = "neopool",
        name: str | None = None,
        loglevel: str = "INFO",
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        app_module: str = "neopool.testing.celery_worker",
    ) -> None:
        self.app = app
        self.app_module = app_module
        self.config = config
        self.pool = pool
        self.concurrency = concurrency
        self.queue = queue
        self.nodename = f"{name or queue}@localhost"
        self.loglevel = loglevel
        self.extra_args = extra_args
        self.extra_env = env or {}
        self.log_path = Path(tempfile.mkstemp(prefix=f"neopool-worker-{queue}-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "NEO4J_URI": self.config.uri,
                "NEO4J_USERNAME": self.config.username,
                "NEO4J_PASSWORD": self.config.password.get_secret_value(),
                BROKER_ENV: str(self.app.conf.broker_url),
                QUEUE_ENV: self.queue,
                "NEO4J_DATABASE": self.config.database or "",
                "PYTHONUNBUFFERED": "1",
            }
        )
        for field in ("pool_max_size", "pool_min_size"):
            env[f"NEOPOOL_{field.upper()}"] = str(getattr(self.config, field))
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> CeleryWorkerProcess:
        """Start the worker and return once it answers a ping."""
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app_module,
            "worker",
            f"--pool={self.pool}",
            f"--concurrency={self.concurrency}",
            "-n",
            self.nodename,
            "-Q",
            self.queue,
            f"--loglevel={self.loglevel}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(),
                start_new_session=True,  # a terminal's Ctrl-C reaches the parent only
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise WorkerError(f"the worker exited during start-up:\n{self.log_tail()}")
            if self.app.control.ping(destination=[self.nodename], timeout=0.5):
                return self
        self.kill()
        raise WorkerError(f"the worker did not answer within {timeout:g}s:\n{self.log_tail()}")

    @property
    def pid(self) -> int | None:
        """The worker's main process id."""
        return self.process.pid if self.process else None

    def stop(self, timeout: float = 30.0) -> int:
        """Warm shutdown (SIGTERM): finish running tasks, close pools; return the exit code."""
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise WorkerError(
                    f"the worker did not stop within {timeout:g}s:\n{self.log_tail()}"
                ) from None
        return int(process.returncode)

    def kill(self) -> None:
        """Kill the worker and every process of its session (prefork children)."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def log(self) -> str:
        """Everything the worker has logged."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        """The end of the worker's log."""
        return "\n".join(self.log().splitlines()[-lines:])

    def end(self) -> None:
        """Stop warmly; kill whatever is left."""
        try:
            self.stop()
        finally:
            self.kill()
