"""The demo's Celery worker: a real ``celery worker`` child process, stopped warmly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from neopool.config import Neo4jConnectionConfig
from neopool.demo.app import WORKER_ENV
from neopool.testing.celery_app import BROKER_ENV, QUEUE_ENV


class DemoWorker:
    """``python -m celery -A neopool.demo.app worker --pool=prefork -c N`` as a child.

    It runs in its own session, so a Ctrl-C in the terminal reaches the demo
    only, and the demo stops the worker itself: SIGTERM (warm shutdown: running
    tasks finish, pools close), then SIGKILL of the whole group if that hangs.
    """

    def __init__(
        self, app: Any, config: Neo4jConnectionConfig, *, concurrency: int, queue: str
    ) -> None:
        self.app = app
        self.config = config
        self.concurrency = concurrency
        self.queue = queue
        self.nodename = f"{queue}-{os.getpid()}@localhost"
        handle, name = tempfile.mkstemp(prefix="neopool-demo-worker-", suffix=".log")
        os.close(handle)
        self.log_path = Path(name)
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
                WORKER_ENV: "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def start(self, timeout: float = 60.0) -> DemoWorker:
        """Start the worker; return once it answers a ping."""
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "neopool.demo.app",
            "worker",
            "--pool=prefork",
            f"--concurrency={self.concurrency}",
            "-n",
            self.nodename,
            "-Q",
            self.queue,
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Celery worker exited during start-up:\n{self.log_tail()}")
            if self.app.control.ping(destination=[self.nodename], timeout=0.5):
                return self
        raise RuntimeError(f"the Celery worker did not answer within {timeout:g}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Warm shutdown, then kill the process group if it does not end in time."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # prefork children, if any linger
        if process.poll() is None:
            process.wait()

    def log_tail(self, lines: int = 30) -> str:
        """The end of the worker's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> DemoWorker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)
