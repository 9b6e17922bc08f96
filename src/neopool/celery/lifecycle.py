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

``"thread"``
    a persistent loop per worker thread: one under prefork and solo, one per
    thread under threads. One task at a time per loop.
``"process"``
    one loop per worker process, on a thread of its own, owned by
    :mod:`neopool.runner`; every task of the process runs on it. With
    ``--pool=threads``, ``--concurrency`` is the number of tasks in flight on
    that loop, sharing one pool (``pool_max_size`` borrows at once, the rest
    wait in line) and one driver. Libraries with process-wide asyncio state
    (LightRAG) need it under threads.

Unless told, the worker picks at start: ``"process"`` under ``--pool=threads``
when LightRAG is loaded (its process-wide locks and shared storage cannot be
used from a loop per thread: every document would fail), ``"thread"``
everywhere else. It says once, at start, which mode it runs and what that
means (blocking calls, time limits, revoking), naming the setting that
changes it. In the process mode under threads, ``pool_max_size`` defaults to
the worker's concurrency (when above the configured default), so ``-c N``
tasks in flight do not queue for leases.

A warm shutdown gives the tasks in flight ``drain_timeout`` seconds; the
coroutines still running then are cancelled (their leases come back), and once
Celery's pool has stopped every loop is closed, the process loop last, within
``shutdown_timeout`` (``SHUTDOWN_TIMEOUT`` unless given).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from typing import Any, Literal, get_args

from neopool import runner
from neopool.celery.stats import PublishDir, StatsPublisher, register_command
from neopool.celery.task import worker_pool
from neopool.config import Neo4jConnectionConfig
from neopool.errors import ConfigError, NeopoolError
from neopool.registry import GlobalNeo4jConnectionPool

logger = logging.getLogger("neopool")

#: Seconds a worker (or worker process) shutdown spends on closing loops and pools at most,
#: unless ``setup(shutdown_timeout=...)`` says otherwise.
SHUTDOWN_TIMEOUT = 10.0
#: Seconds tasks in flight get to finish at a warm shutdown before their coroutines are cancelled.
DRAIN_TIMEOUT = 30.0
#: The loop modes :func:`setup` knows, and the variable that picks one when ``loop`` is not given.
LoopMode = Literal["thread", "process"]
LOOP_MODES: tuple[LoopMode, ...] = get_args(LoopMode)
LOOP_ENV = "NEOPOOL_CELERY_LOOP"
#: Modules whose presence in the worker means LightRAG runs there (its state is process-wide).
LIGHTRAG_MODULES = ("lightrag", "neopool.integrations.lightrag")
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
        loop_mode: LoopMode | None,
        drain_timeout: float,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    ) -> None:
        self.app = app
        self.config = config
        #: ``None`` until the worker starts, unless given: then picked from the worker's pool.
        self.loop_mode: LoopMode | None = loop_mode
        self.drain_timeout = drain_timeout
        self.shutdown_timeout = shutdown_timeout
        #: What the worker says once it is ready (at worker_init, Celery's logging is not set up).
        self.start_notes: list[tuple[int, str]] = []
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
        kind = _pool_kind(pool)
        given = self.loop_mode
        if self.loop_mode is None:
            self.loop_mode = _default_loop_mode(kind)
        self._configure()
        if self.loop_mode == "process" and kind == "threads":
            self._size_for(_concurrency(sender))
        self._use_loop_mode()
        # Prefork children get Celery's soft-time-limit signal and no revocations;
        # threads and solo get no signal and hear of every revocation.
        worker_pool(kind)
        self.start_notes += _mode_notes(kind, self.loop_mode, chosen=given is None)
        if kind == "threads" and self.app.conf.task_time_limit:
            self.start_notes.append(
                (
                    logging.WARNING,
                    f"neopool: task_time_limit ({self.app.conf.task_time_limit} s) is not "
                    f"enforced under --pool=threads: a thread cannot be killed. Use "
                    f"task_soft_time_limit (AsyncTask cancels the coroutine) or --pool=prefork",
                )
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

        Bounded: the whole shutdown takes at most ``shutdown_timeout`` seconds.
        """
        budget = self.shutdown_timeout
        deadline = time.monotonic() + budget
        closed = runner.close_all_loops(budget)
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

    def _size_for(self, concurrency: int | None) -> None:
        """Process loop under threads: ``pool_max_size`` defaults to the worker's concurrency.

        ``-c N`` tasks share the one loop's pool; with fewer leases than tasks,
        the first wave queues (and logs that the pool ran dry) at the default.
        A ``pool_max_size`` set in the config or the environment is kept.
        """
        config = self.config or GlobalNeo4jConnectionPool.get_config()
        if concurrency is None or concurrency <= config.pool_max_size:
            return
        if "pool_max_size" in config.model_fields_set:
            self.start_notes.append(
                (
                    logging.INFO,
                    f"neopool: pool_max_size is {config.pool_max_size}, below the worker's "
                    f"concurrency ({concurrency}): tasks beyond it wait for a lease",
                )
            )
            return
        update: dict[str, Any] = {"pool_max_size": concurrency}
        if concurrency > config.max_connection_pool_size:
            if "max_connection_pool_size" in config.model_fields_set:
                update["pool_max_size"] = config.max_connection_pool_size
            else:
                update["max_connection_pool_size"] = concurrency
        if update["pool_max_size"] <= config.pool_max_size:
            return
        self.config = config.model_copy(update=update)
        GlobalNeo4jConnectionPool.set_config(self.config)
        self.start_notes.append(
            (
                logging.INFO,
                f"neopool: pool_max_size {self.config.pool_max_size} (the worker's "
                f"concurrency): {concurrency} tasks in flight share the process loop's pool; "
                f"set NEOPOOL_POOL_MAX_SIZE to choose another size",
            )
        )

    def on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        """The worker is up, its logging too: say what was decided at start, once."""
        notes, self.start_notes = self.start_notes, []
        for level, line in notes:
            logger.log(level, "%s", line)

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
    loop: LoopMode | None = None,
    drain_timeout: float | None = None,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
) -> None:
    """Wire neopool into ``app``'s workers; call once, where the app is created.

    * worker start: use ``config`` (or read ``NEO4J_*`` now, so a bad value
      stops the worker at start rather than failing its first task); each prefork
      child starts from an empty registry and opens no connection until its first task;
    * ``loop``: ``"thread"`` (a persistent loop per worker thread) or
      ``"process"`` (one loop per worker process, on a thread of its own; with
      ``--pool=threads -c N``, N tasks in flight on it, and ``pool_max_size``
      defaulting to N). ``None`` reads ``NEOPOOL_CELERY_LOOP``; if unset, the
      worker picks at start: ``"process"`` under ``--pool=threads`` with
      LightRAG loaded (a loop per thread cannot share LightRAG's process-wide
      state), ``"thread"`` otherwise. The worker logs its mode once at start,
      with what it means for blocking calls and time limits. Applied in the
      worker only;
    * worker shutdown (warm): tasks in flight get ``drain_timeout`` seconds
      (``None`` reads ``NEOPOOL_CELERY_DRAIN_TIMEOUT``, else 30; ``math.inf``: as
      long as Celery waits), then their coroutines are cancelled;
      then every persistent loop is closed, which closes its pool and driver on
      that loop, within ``shutdown_timeout`` seconds in all; under prefork each
      child does this for itself;
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
    if not 0 <= shutdown_timeout < math.inf:  # NaN too
        raise ConfigError(
            f"shutdown_timeout must be 0 or more seconds, and finite (every end is bounded), "
            f"not {shutdown_timeout}"
        )
    register_command()
    lifecycle = _WorkerLifecycle(
        app, config, mode, _drain_timeout(drain_timeout), float(shutdown_timeout)
    )
    app._neopool_lifecycle = lifecycle  # keeps the handlers alive with the app
    uid = f"neopool-{id(app)}"
    signals.worker_init.connect(lifecycle.on_worker_init, weak=False, dispatch_uid=f"{uid}-init")
    signals.worker_ready.connect(lifecycle.on_worker_ready, weak=False, dispatch_uid=f"{uid}-ready")
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


def _loop_mode(loop: str | None) -> LoopMode | None:
    """The mode given (argument, else environment), checked; ``None``: the worker picks."""
    mode = loop if loop is not None else (os.environ.get(LOOP_ENV) or None)
    if mode is None:
        return None
    for known in LOOP_MODES:
        if mode == known:
            return known
    source = "loop" if loop is not None else LOOP_ENV
    raise ConfigError(f"{source} must be one of {', '.join(LOOP_MODES)}, not {mode!r}")


def _pool_kind(pool: str) -> str:
    """``prefork``, ``threads`` or ``solo`` from the worker's pool class or name.

    The command line gives the class (``celery.concurrency.thread.TaskPool``),
    the configuration may give the name (``threads``).
    """
    name = pool.lower()
    if "thread" in name:
        return "threads"
    if "solo" in name:
        return "solo"
    if "prefork" in name or "processes" in name:
        return "prefork"
    return name or "prefork"  # Celery's default


def _lightrag_loaded() -> bool:
    return any(name in sys.modules for name in LIGHTRAG_MODULES)


def _default_loop_mode(kind: str) -> LoopMode:
    """``"process"`` where a loop per thread cannot work (threads + LightRAG), else ``"thread"``."""
    return "process" if kind == "threads" and _lightrag_loaded() else "thread"


def _concurrency(sender: Any) -> int | None:
    """The most tasks the worker runs at once (autoscale's maximum), if known."""
    for name in ("max_concurrency", "concurrency"):
        value = getattr(sender, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _mode_notes(kind: str, mode: LoopMode, *, chosen: bool) -> list[tuple[int, str]]:
    """What to say once at worker start: the loop mode, why, and what it means for this pool."""
    notes: list[tuple[int, str]] = []
    how = (
        f"chosen: --pool=threads with LightRAG loaded; {LOOP_ENV} or setup(loop=...) sets it"
        if chosen and mode == "process"
        else (f"the default; {LOOP_ENV} or setup(loop=...) sets it" if chosen else "as set")
    )
    if mode == "process":
        line = (
            f"neopool: loop mode 'process' ({how}): every task of a worker process runs on "
            f"its one event loop (thread {runner.PROCESS_LOOP_THREAD}), with one driver. A "
            f"blocking call in a coroutine stalls every task of the process; neopool warns "
            f"when the loop is blocked longer than blocked_loop_threshold "
            f"(NEOPOOL_BLOCKED_LOOP_THRESHOLD)."
        )
    else:
        line = f"neopool: loop mode 'thread' ({how}): a persistent event loop per worker thread."
        if kind == "threads":
            line += (
                f" Under --pool=threads that is one loop and one driver per thread; "
                f"{LOOP_ENV}=process (setup(loop='process')) shares one per process, and "
                f"libraries with process-wide asyncio state (LightRAG) need it."
            )
            if _lightrag_loaded():
                notes.append(
                    (
                        logging.WARNING,
                        f"neopool: loop mode 'thread' under --pool=threads with LightRAG "
                        f"loaded: LightRAG's process-wide locks and storages cannot be shared "
                        f"by a loop per thread, so its tasks will fail; set {LOOP_ENV}=process "
                        f"or setup(loop='process')",
                    )
                )
    if kind == "threads":
        line += (
            " The threads pool enforces no hard time limit (task_time_limit): a task stuck "
            "in a blocking call runs on; AsyncTask enforces soft limits "
            "(task_soft_time_limit) and revokes by cancelling the coroutine."
        )
    elif kind == "prefork":
        line += (
            " To stop a running task without killing its process (and its pool), revoke it "
            "with terminate=True, signal='SIGUSR1' (the default SIGTERM kills the child)."
        )
    return [(logging.INFO, line), *notes]


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
