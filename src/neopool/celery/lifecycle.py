"""Worker lifecycle: configure at start, close every pool on its own loop at shutdown.

Which signals fire where:

==========================  ==================  ==================================
signal                      prefork             threads / solo
==========================  ==================  ==================================
``worker_init``             main process        main process
``worker_process_init``     each child          (solo: main process)
``task_postrun``            each child          the task's thread
``worker_shutting_down``    main process        main process, as shutdown begins
``worker_process_shutdown`` each child          (not sent)
``worker_shutdown``         main process        main process, after the pool stops
==========================  ==================  ==================================

Nothing here opens a connection: the first task of each loop does, so
``worker_process_init`` returns in microseconds (Celery kills a child that takes
more than 4 s).

Two loop modes (``setup(app, loop=...)``, or ``NEOPOOL_CELERY_LOOP``):

``"thread"`` (default)
    a persistent loop per worker thread: one under prefork and solo, one per
    thread under threads. One task at a time per loop.
``"process"``
    one loop per worker process, on a thread of its own, owned by
    :mod:`neopool.runner`; every task of the process runs on it. With
    ``--pool=threads``, ``--concurrency`` is the number of tasks in flight on
    that loop, sharing one pool (``pool_max_size`` borrows at once, the rest
    wait in line) and one driver. Libraries with process-wide asyncio state
    (LightRAG) need it under threads.

A warm shutdown gives the tasks in flight ``drain_timeout`` seconds; the
coroutines still running then are cancelled (their leases come back), and once
Celery's pool has stopped every loop is closed, the process loop last, within
``SHUTDOWN_TIMEOUT``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any

from neopool import runner
from neopool.celery.stats import PublishDir, StatsPublisher, register_command
from neopool.celery.task import soft_time_limits_signalled
from neopool.config import Neo4jConnectionConfig
from neopool.errors import ConfigError, NeopoolError
from neopool.registry import GlobalNeo4jConnectionPool

logger = logging.getLogger("neopool")

#: Seconds a worker (or worker process) shutdown spends on closing loops and pools at most.
SHUTDOWN_TIMEOUT = 10.0
#: Seconds tasks in flight get to finish at a warm shutdown before their coroutines are cancelled.
DRAIN_TIMEOUT = 30.0
#: The loop modes :func:`setup` knows, and the variable that picks one when ``loop`` is not given.
LOOP_MODES = ("thread", "process")
LOOP_ENV = "NEOPOOL_CELERY_LOOP"
#: The variable that sets ``drain_timeout`` when it is not given.
DRAIN_ENV = "NEOPOOL_CELERY_DRAIN_TIMEOUT"

#: Celery pools whose tasks share one thread between many greenlets.
GREEN_POOLS = ("gevent", "eventlet")


class UnsupportedPool(NeopoolError, RuntimeError):
    """The worker uses a pool neopool cannot give a persistent loop to."""


class _WorkerLifecycle:
    """The handlers :func:`setup` connects, with the state they share."""

    def __init__(
        self,
        app: Any,
        config: Neo4jConnectionConfig | None,
        loop_mode: str,
        drain_timeout: float,
    ) -> None:
        self.app = app
        self.config = config
        self.loop_mode = loop_mode
        self.drain_timeout = drain_timeout
        self.main_pid: int | None = None
        self.publisher: StatsPublisher | None = None
        #: Where prefork children publish their stats: created at worker_init by the
        #: main process, inherited by the children it forks (see neopool.celery.stats).
        self.publish_dir: PublishDir | None = None

    # -- main process ------------------------------------------------------------
    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        if sender is not None and getattr(sender, "app", self.app) is not self.app:
            return
        pool = str(getattr(sender, "pool_cls", "") or self.app.conf.worker_pool or "")
        if any(green in pool.lower() for green in GREEN_POOLS):
            error = UnsupportedPool(
                f"neopool.celery does not support the {pool!r} pool: greenlets share one "
                f"thread, so they cannot each run a persistent event loop. Use "
                f"--pool=prefork, threads or solo."
            )
            logger.critical("%s", error)
            raise SystemExit(str(error))  # Celery logs and ignores an Exception here
        self._configure()
        self._use_loop_mode()
        # Prefork children get Celery's soft-time-limit signal; threads and solo get none.
        soft_time_limits_signalled("prefork" in pool.lower())
        if self.loop_mode == "process":
            logger.info(
                "neopool: process-loop mode: every task of a worker process runs on its "
                "one event loop (thread %s)",
                runner.PROCESS_LOOP_THREAD,
            )
        self.main_pid = os.getpid()
        try:
            self.publish_dir = PublishDir.create()
        except OSError as exc:
            logger.warning("neopool: prefork pool stats will not be published: %s", exc)

    def on_worker_shutting_down(self, **_: Any) -> None:
        """Warm shutdown begins (in a signal handler): give the tasks in flight a deadline."""
        if math.isinf(self.drain_timeout) or self.main_pid != os.getpid():
            return
        threading.Thread(target=self._drain, name="neopool-drain", daemon=True).start()

    def _drain(self) -> None:
        """Wait for this process's calls in flight; cancel those still running at the deadline."""
        if runner.wait_for_calls(self.drain_timeout):
            return
        cancelled = runner.cancel_calls(
            f"the worker is shutting down and the task was still running after "
            f"drain_timeout ({self.drain_timeout:g} s)"
        )
        logger.warning(
            "neopool: warm shutdown: %d task(s) still running after %.1f s; cancelled "
            "their coroutines (their leases are returned)",
            cancelled,
            self.drain_timeout,
        )

    def on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        if sender is not None and getattr(sender, "app", self.app) is not self.app:
            return
        self._close_all("worker")
        if self.main_pid == os.getpid() and self.publish_dir is not None:
            try:
                self.publish_dir.remove()
            except OSError as exc:
                logger.warning("neopool: could not remove %s: %s", self.publish_dir.path, exc)

    # -- each process that runs tasks ----------------------------------------------
    def on_worker_process_init(self, **_: Any) -> None:
        if self.main_pid is None or os.getpid() == self.main_pid:
            return  # solo sends it in the main process: nothing was forked
        self._configure()  # the fork hook already emptied the registry (neopool._fork)
        self._use_loop_mode()  # inherited through fork already; not through spawn
        if self.publish_dir is not None:
            self.publisher = StatsPublisher(self.publish_dir)
        self._publish()

    def on_task_postrun(self, **_: Any) -> None:
        self._publish()

    def on_worker_process_shutdown(self, **_: Any) -> None:
        self._close_all("worker process")
        if self.publisher is not None:
            self.publisher.withdraw()

    # -- helpers -----------------------------------------------------------------
    def _close_all(self, what: str) -> None:
        """Close every persistent loop (so its pool closes on it), then end any other pool.

        Bounded: the whole shutdown takes at most ``SHUTDOWN_TIMEOUT`` seconds.
        """
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        closed = runner.close_all_loops(SHUTDOWN_TIMEOUT)
        registry = GlobalNeo4jConnectionPool()
        registry.shutdown(max(0.0, deadline - time.monotonic()))
        logger.info(
            "neopool: %s %d shut down: closed %d event loop(s); %d pool(s) left open",
            what,
            os.getpid(),
            closed,
            len(registry.pools()),
        )

    def _use_loop_mode(self) -> None:
        if self.loop_mode == "process":
            runner.use_process_loop()

    def _configure(self) -> None:
        if self.config is not None:
            GlobalNeo4jConnectionPool.set_config(self.config)
        else:
            GlobalNeo4jConnectionPool.get_config()  # reads NEO4J_*; a bad value fails here

    def _publish(self) -> None:
        if self.publisher is None:
            return
        try:
            self.publisher.publish()
        except OSError as exc:
            logger.debug("neopool: could not publish pool stats: %s", exc)


def setup(
    app: Any,
    config: Neo4jConnectionConfig | None = None,
    *,
    loop: str | None = None,
    drain_timeout: float | None = None,
) -> None:
    """Wire neopool into ``app``'s workers; call once, where the app is created.

    * worker start: use ``config`` (or read ``NEO4J_*`` now, so a bad value
      stops the worker at start rather than failing its first task); each prefork
      child starts from an empty registry and opens no connection until its first task;
    * ``loop``: ``"thread"`` (a persistent loop per worker thread, the default) or
      ``"process"`` (one loop per worker process, on a thread of its own; with
      ``--pool=threads -c N``, N tasks in flight on it). ``None`` reads
      ``NEOPOOL_CELERY_LOOP``, else ``"thread"``. Applied in the worker only;
    * worker shutdown (warm): tasks in flight get ``drain_timeout`` seconds
      (``None`` reads ``NEOPOOL_CELERY_DRAIN_TIMEOUT``, else 30; ``math.inf``: as
      long as Celery waits), then their coroutines are cancelled;
      then every persistent loop is closed, which closes its pool and driver on
      that loop; under prefork each child does this for itself;
    * ``celery -A proj inspect neopool_stats`` and :func:`neopool.celery.cluster_stats`
      report the pools of every loop of every worker process.

    Async tasks use ``@app.task(base=AsyncTask)``; sync tasks may call
    :func:`neopool.run` (on the same loop, in process-loop mode). Supports the
    prefork, threads and solo pools; gevent and eventlet stop the worker at
    start with an :class:`UnsupportedPool` message.
    """
    from celery import signals

    if config is not None and not isinstance(config, Neo4jConnectionConfig):
        raise TypeError(
            f"setup() takes a Neo4jConnectionConfig or None, not {type(config).__name__}"
        )
    mode = _loop_mode(loop)
    register_command()
    lifecycle = _WorkerLifecycle(app, config, mode, _drain_timeout(drain_timeout))
    app._neopool_lifecycle = lifecycle  # keeps the handlers alive with the app
    uid = f"neopool-{id(app)}"
    signals.worker_init.connect(lifecycle.on_worker_init, weak=False, dispatch_uid=f"{uid}-init")
    signals.worker_shutting_down.connect(
        lifecycle.on_worker_shutting_down, weak=False, dispatch_uid=f"{uid}-shutting-down"
    )
    signals.worker_shutdown.connect(
        lifecycle.on_worker_shutdown, weak=False, dispatch_uid=f"{uid}-shutdown"
    )
    signals.worker_process_init.connect(
        lifecycle.on_worker_process_init, weak=False, dispatch_uid=f"{uid}-process-init"
    )
    signals.worker_process_shutdown.connect(
        lifecycle.on_worker_process_shutdown, weak=False, dispatch_uid=f"{uid}-process-shutdown"
    )
    signals.task_postrun.connect(
        lifecycle.on_task_postrun, weak=False, dispatch_uid=f"{uid}-postrun"
    )


def _loop_mode(loop: str | None) -> str:
    mode = loop if loop is not None else (os.environ.get(LOOP_ENV) or "thread")
    if mode not in LOOP_MODES:
        source = "loop" if loop is not None else LOOP_ENV
        raise ConfigError(f"{source} must be one of {', '.join(LOOP_MODES)}, not {mode!r}")
    return mode


def _drain_timeout(drain_timeout: float | None) -> float:
    source, value = "drain_timeout", drain_timeout
    if value is None:
        text = os.environ.get(DRAIN_ENV)
        if not text:
            return DRAIN_TIMEOUT
        source = DRAIN_ENV
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    if not value >= 0:  # NaN too
        raise ConfigError(f"{source} must be 0 or more seconds (math.inf: no limit), not {value}")
    return float(value)
