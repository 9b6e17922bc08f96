"""Pool stats of every worker process, and the ``neopool_stats`` inspect command.

Remote-control commands run in the worker's main process. Under the threads
and solo pools that is where the pools live, so the command reads them
directly. Under prefork they live in the child processes, which the main
process cannot see into; so each child *publishes* its stats: after every task
(Celery's ``task_postrun``, in the child) it writes ``<pid>.json`` into a
directory private to its parent worker, ``<tmp>/neopool-celery-<uid>/<parent
pid>/``, atomically (write, then rename). The command reads the files of the
children that are alive now; files of children that died are ignored and
removed. A file is a few hundred bytes written once per task, far below the
cost of the task's own broker round trips, and it needs no extra connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from neopool.registry import GlobalNeo4jConnectionPool
from neopool.stats import PoolStats

#: ``{loop id: stats}`` of one process.
ProcessStats = dict[str, PoolStats]
#: ``{worker node name: {"<pid>": {loop id: stats}}}``.
ClusterStats = dict[str, dict[str, ProcessStats]]

COMMAND = "neopool_stats"


def process_stats() -> ProcessStats:
    """``{loop id: stats}`` of this process's live pools (no loop needed)."""
    return {pool.loop_id: pool.stats() for pool in GlobalNeo4jConnectionPool().pools()}


def publish_dir(parent_pid: int) -> Path:
    """Where the children of worker ``parent_pid`` publish their stats."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"neopool-celery-{uid}" / str(parent_pid)


class StatsPublisher:
    """Writes this child's stats where its parent worker reads them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / f"{os.getpid()}.json"
        self._tmp = directory / f".{os.getpid()}.json.tmp"

    def publish(self) -> None:
        """Write the current stats (atomically: readers never see half a file)."""
        payload = json.dumps(process_stats())
        self._tmp.write_text(payload)
        os.replace(self._tmp, self.path)

    def withdraw(self) -> None:
        """Remove this child's file (it is shutting down)."""
        for path in (self.path, self._tmp):
            with contextlib.suppress(OSError):
                path.unlink()


def prepare_publish_dir(parent_pid: int) -> Path:
    """Create (empty) the directory of a worker that is starting."""
    directory = publish_dir(parent_pid)
    remove_publish_dir(parent_pid)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def remove_publish_dir(parent_pid: int) -> None:
    """Remove a worker's directory and everything its children wrote."""
    directory = publish_dir(parent_pid)
    if directory.is_dir():
        for path in directory.iterdir():
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            directory.rmdir()


def read_children(parent_pid: int, live_pids: list[int]) -> dict[str, ProcessStats]:
    """``{"<pid>": stats}`` published by the live children of ``parent_pid``."""
    directory = publish_dir(parent_pid)
    found: dict[str, ProcessStats] = {}
    if not directory.is_dir():
        return found
    live = {str(pid) for pid in live_pids}
    for path in directory.glob("*.json"):
        pid = path.stem
        if pid not in live:
            with contextlib.suppress(OSError):
                path.unlink()  # a child that died; Celery has replaced it
            continue
        with contextlib.suppress(OSError, ValueError):
            found[pid] = json.loads(path.read_text())
    for pid in live:  # a child that has not published yet still counts
        found.setdefault(pid, {})
    return found


def worker_stats(pool: Any) -> dict[str, ProcessStats]:
    """What the ``neopool_stats`` command replies for this worker.

    ``pool`` is the worker's Celery task pool. Prefork children's published
    stats, plus this process's own pools (the only ones under threads/solo).
    """
    me = os.getpid()
    info: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        info = dict(pool.info)
    children = [int(pid) for pid in info.get("processes", ()) if int(pid) != me]
    result: dict[str, ProcessStats] = {}
    own = process_stats()
    if own or not children:
        result[str(me)] = own
    result.update(read_children(me, children))
    return result


def register_command() -> None:
    """Register ``neopool_stats`` with Celery's remote control (once per process)."""
    from celery.worker.control import Panel, inspect_command

    if COMMAND in Panel.data:
        return

    @inspect_command(name=COMMAND)  # type: ignore[untyped-decorator]
    def neopool_stats(state: Any) -> dict[str, ProcessStats]:
        """Pool stats of every event loop of every process of this worker."""
        return worker_stats(state.consumer.pool)


def cluster_stats(app: Any, timeout: float = 2.0) -> ClusterStats:
    """Pool stats of every event loop of every worker process in the cluster.

    Returns ``{worker node name: {"<pid>": {"<loop id>": PoolStats}}}``: one
    entry per worker that replied within ``timeout`` seconds; under it one
    entry per process that runs tasks (each prefork child, or the worker
    itself under threads/solo), and under that the stats of each event loop's
    pool in that process (empty before the first borrow). The same data as
    ``celery -A proj inspect neopool_stats``.
    """
    replies = app.control.broadcast(COMMAND, reply=True, timeout=timeout) or []
    merged: ClusterStats = {}
    for reply in replies:
        for node, payload in reply.items():
            if isinstance(payload, dict) and "error" not in payload:
                merged[node] = payload
    return merged
