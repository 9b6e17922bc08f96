"""Worker lifecycle: configure at start, close every pool on its own loop at shutdown.

Which signals fire where:

=========================  ==================  ==================================
signal                     prefork             threads / solo
=========================  ==================  ==================================
``worker_init``            main process        main process
``worker_process_init``    each child          (solo: main process)
``task_postrun``           each child          the task's thread
``worker_process_shutdown`` each child         (not sent)
``worker_shutdown``        main process        main process, after the pool stops
=========================  ==================  ==================================

Nothing here opens a connection: the first task of each loop does, so
``worker_process_init`` returns in microseconds (Celery kills a child that takes
more than 4 s).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from neopool.celery.stats import PublishDir, StatsPublisher, register_command
from neopool.config import Neo4jConnectionConfig
from neopool.errors import NeopoolError
from neopool.registry import GlobalNeo4jConnectionPool
from neopool.runner import close_all_loops

logger = logging.getLogger("neopool")

#: Seconds a worker (or worker process) shutdown spends on neopool at most.
SHUTDOWN_TIMEOUT = 10.0

#: Celery pools whose tasks share one thread between many greenlets.
GREEN_POOLS = ("gevent", "eventlet")


class UnsupportedPool(NeopoolError, RuntimeError):
    """The worker uses a pool neopool cannot give a persistent loop to."""


class _WorkerLifecycle:
    """The handlers :func:`setup` connects, with the state they share."""

    def __init__(self, app: Any, config: Neo4jConnectionConfig | None) -> None:
        self.app = app
        self.config = config
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
        self.main_pid = os.getpid()
        try:
            self.publish_dir = PublishDir.create()
        except OSError as exc:
            logger.warning("neopool: prefork pool stats will not be published: %s", exc)

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
        closed = close_all_loops(SHUTDOWN_TIMEOUT)
        registry = GlobalNeo4jConnectionPool()
        registry.shutdown(max(0.0, deadline - time.monotonic()))
        logger.info(
            "neopool: %s %d shut down: closed %d event loop(s); %d pool(s) left open",
            what,
            os.getpid(),
            closed,
            len(registry.pools()),
        )

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


def setup(app: Any, config: Neo4jConnectionConfig | None = None) -> None:
    """Wire neopool into ``app``'s workers; call once, where the app is created.

    * worker start: use ``config`` (or read ``NEO4J_*`` now, so a bad value
      stops the worker at start rather than failing its first task); each prefork
      child starts from an empty registry and opens no connection until its first task;
    * worker shutdown (warm): every persistent loop is closed, which closes its pool
      and driver on that loop; under prefork each child does this for itself;
    * ``celery -A proj inspect neopool_stats`` and :func:`neopool.celery.cluster_stats`
      report the pools of every loop of every worker process.

    Async tasks use ``@app.task(base=AsyncTask)``; sync tasks may call
    :func:`neopool.run`. Supports the prefork, threads and solo pools; gevent and
    eventlet stop the worker at start with an :class:`UnsupportedPool` message.
    """
    from celery import signals

    if config is not None and not isinstance(config, Neo4jConnectionConfig):
        raise TypeError(
            f"setup() takes a Neo4jConnectionConfig or None, not {type(config).__name__}"
        )
    register_command()
    lifecycle = _WorkerLifecycle(app, config)
    app._neopool_lifecycle = lifecycle  # keeps the handlers alive with the app
    uid = f"neopool-{id(app)}"
    signals.worker_init.connect(lifecycle.on_worker_init, weak=False, dispatch_uid=f"{uid}-init")
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
