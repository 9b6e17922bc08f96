"""Pool stats of every worker process, and the ``neopool_stats`` inspect command.

Remote-control commands run in the worker's main process. Under the threads
and solo pools that is where the pools live, so the command reads them
directly. Under prefork they live in the child processes, which the main
process cannot see into; so each child *publishes* its stats: after every task
(Celery's ``task_postrun``, in the child) it writes ``<pid>.json`` into its
worker's :class:`PublishDir`, atomically (write, then rename). The command
reads the files of the children that are alive now; files of children that
died are ignored and removed. A file is a few hundred bytes written once per
task, far below the cost of the task's own broker round trips, and it needs no
extra connection.

The directory follows the lifecycle contract's rule 7 ("files are ours or
untouched"). The worker's main process creates it at ``worker_init`` with
:func:`tempfile.mkdtemp` (an unpredictable name, mode 0700) and keeps it in
memory; prefork children are forked from that process and so inherit it. No
path is derived from a pid or a uid, and none is read from the environment.
Before every use the path is checked with :func:`os.lstat`, opened with
``O_NOFOLLOW | O_DIRECTORY`` and checked again on the open descriptor: it must
be a real directory, owned by this user, mode 0700, and the very directory
(device and inode) that was created. Anything else is refused: the operation
raises :class:`UnsafeStatsDir` (an :class:`OSError`) after logging the reason
once, and nothing in it is read, written or removed. Inside the directory,
everything goes through its descriptor (``dir_fd``): a file is written under a
temporary name created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (mode 0600) and
renamed over the final name; a file is read only if it opens with
``O_NOFOLLOW`` and is a regular file owned by this user; and only files with
neopool's names that are regular files owned by this user are ever removed. At
shutdown the main process removes those files and the directory itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from neopool.errors import UnsafeStatsDir
from neopool.registry import GlobalNeo4jConnectionPool
from neopool.stats import PROCESS, PoolStats, ProcessTotals

__all__ = [
    "ClusterStats",
    "ClusterTotals",
    "ProcessStats",
    "UnsafeStatsDir",
    "cluster_stats",
    "cluster_totals",
    "process_stats",
]

logger = logging.getLogger("neopool")

#: ``{loop id: stats}`` of one process.
ProcessStats = dict[str, PoolStats]
#: ``{worker node name: {"<pid>": {loop id: stats}}}``.
ClusterStats = dict[str, dict[str, ProcessStats]]
#: ``{worker node name: {"<pid>": totals}}``.
ClusterTotals = dict[str, dict[str, ProcessTotals]]

COMMAND = "neopool_stats"
TOTALS_COMMAND = "neopool_totals"

#: Prefix of the directory's (otherwise random) name.
DIR_PREFIX = "neopool-celery-"
#: The only permissions the directory may have.
DIR_MODE = 0o700
#: A published file larger than this is not read.
MAX_FILE_BYTES = 1 << 20

_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY: int = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)
_DIR_FLAGS = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC
#: ``O_NOFOLLOW``, ``O_DIRECTORY``, ``*at()`` calls and uids: POSIX (Linux, macOS).
SUPPORTED = bool(_NOFOLLOW and _DIRECTORY and hasattr(os, "geteuid")) and (
    os.open in os.supports_dir_fd
)

_PUBLISHED = re.compile(r"([0-9]+)\.json")
_TEMPORARY = re.compile(r"\.([0-9]+)\.json\.tmp")


def process_stats() -> ProcessStats:
    """``{loop id: stats}`` of this process's live pools (no loop needed)."""
    return {pool.loop_id: pool.stats() for pool in GlobalNeo4jConnectionPool().pools()}


def _zero_totals(pid: int) -> ProcessTotals:
    """The totals of a process that has not published yet."""
    return ProcessTotals(
        pid=pid,
        loops_served=0,
        pools_closed=0,
        drivers_created=0,
        drivers_closed=0,
        borrows=0,
        loop_blocks=0,
    )


def _euid() -> int:
    return os.geteuid()


def _is_own_file(st: os.stat_result) -> bool:
    """A regular file (not a link, FIFO, device...) owned by this user."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == _euid()


class PublishDir:
    """The private directory where one worker's prefork children publish their stats.

    Create it with :meth:`create` in the worker's main process; its children
    inherit the object through fork. Every use verifies the path again (see
    the module's docstring) and refuses it with :class:`UnsafeStatsDir` if it
    is not, any longer, the directory that was created.
    """

    __slots__ = ("_refused", "device", "inode", "path")

    def __init__(self, path: Path, device: int, inode: int) -> None:
        self.path = path
        self.device = device
        self.inode = inode
        self._refused: str | None = None

    @classmethod
    def create(cls) -> PublishDir:
        """A new directory: unpredictable name in the temp directory, mode 0700, ours."""
        if not SUPPORTED:
            raise UnsafeStatsDir("publishing pool stats needs O_NOFOLLOW and dir_fd (POSIX)")
        path = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))
        fd = os.open(path, _DIR_FLAGS)
        try:
            os.fchmod(fd, DIR_MODE)  # mkdtemp made it 0700 less the umask
            st = os.fstat(fd)
        finally:
            os.close(fd)
        directory = cls(path, st.st_dev, st.st_ino)
        directory._verify(st)
        return directory

    def refusal(self, st: os.stat_result) -> str | None:
        """Why the directory whose stat is ``st`` must not be used (``None``: it is fine)."""
        if stat.S_ISLNK(st.st_mode):
            return "is a symbolic link"
        if not stat.S_ISDIR(st.st_mode):
            return "is not a directory"
        if st.st_uid != _euid():
            return f"is owned by uid {st.st_uid}, not {_euid()}"
        if stat.S_IMODE(st.st_mode) != DIR_MODE:
            return f"has mode {stat.S_IMODE(st.st_mode):#o}, not {DIR_MODE:#o}"
        if (st.st_dev, st.st_ino) != (self.device, self.inode):
            return "is not the directory neopool created (it was replaced)"
        return None

    def _verify(self, st: os.stat_result) -> None:
        reason = self.refusal(st)
        if reason is None:
            self._refused = None
            return
        message = f"refusing the pool-stats directory {self.path}: it {reason}"
        if reason != self._refused:  # once per episode, not once per task
            self._refused = reason
            logger.warning("neopool: %s; prefork pool stats are not published", message)
        raise UnsafeStatsDir(message)

    @contextlib.contextmanager
    def opened(self) -> Iterator[int]:
        """A descriptor of the directory, verified before and after opening it.

        Raises :class:`UnsafeStatsDir` if it is not the directory :meth:`create`
        made, and :class:`FileNotFoundError` if it is gone.
        """
        self._verify(os.lstat(self.path))
        try:
            fd = os.open(self.path, _DIR_FLAGS)
        except OSError:  # replaced by a link or a file since the lstat, say so
            self._verify(os.lstat(self.path))
            raise
        try:
            self._verify(os.fstat(fd))
            yield fd
        finally:
            os.close(fd)

    def remove(self) -> None:
        """Remove the files neopool wrote here, then the directory; follow nothing.

        A directory that is already gone is fine. Entries neopool did not write
        are left alone (and then the directory stays too: ``OSError``).
        """
        try:
            with self.opened() as dir_fd:
                for name in os.listdir(dir_fd):
                    if _PUBLISHED.fullmatch(name) or _TEMPORARY.fullmatch(name):
                        _remove_own(name, dir_fd)
        except FileNotFoundError:
            return
        os.rmdir(self.path)  # never follows a link: a link here fails with ENOTDIR

    def __repr__(self) -> str:
        return f"PublishDir({str(self.path)!r})"


def _remove_own(name: str, dir_fd: int) -> None:
    """Unlink ``name`` if it is a regular file of ours (unlink never follows a link)."""
    with contextlib.suppress(OSError):
        if _is_own_file(os.stat(name, dir_fd=dir_fd, follow_symlinks=False)):
            os.unlink(name, dir_fd=dir_fd)


def _create_exclusive(name: str, dir_fd: int) -> int:
    """Create ``name`` anew (0600), never opening anything that already exists."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    try:
        return os.open(name, flags, 0o600, dir_fd=dir_fd)
    except FileExistsError:  # left by an earlier process with this pid that was killed
        os.unlink(name, dir_fd=dir_fd)
        return os.open(name, flags, 0o600, dir_fd=dir_fd)


def _read_own(name: str, dir_fd: int) -> dict[str, Any] | None:
    """The JSON object in ``name``, if it is a regular file of ours holding one."""
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC, dir_fd=dir_fd)
    except OSError:  # gone, or a symbolic link (ELOOP)
        return None
    with os.fdopen(fd, "rb") as file:
        if not _is_own_file(os.fstat(file.fileno())):
            logger.debug("neopool: ignoring %s in the pool-stats directory", name)
            return None
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        return None
    try:
        stats = json.loads(data)
    except ValueError:
        return None
    return stats if isinstance(stats, dict) else None


class StatsPublisher:
    """Writes this child's stats where its parent worker reads them."""

    def __init__(self, directory: PublishDir) -> None:
        pid = os.getpid()
        self.directory = directory
        self.name = f"{pid}.json"
        self._tmp = f".{pid}.json.tmp"

    @property
    def path(self) -> Path:
        """Where this child's stats are."""
        return self.directory.path / self.name

    def publish(self) -> None:
        """Write the current stats (atomically: readers never see half a file).

        Raises :class:`UnsafeStatsDir` (nothing written) if the directory is not
        the one the worker created, :class:`OSError` if the write fails.
        """
        payload = json.dumps({"pools": process_stats(), "totals": PROCESS.totals()}).encode()
        with self.directory.opened() as dir_fd:
            fd = _create_exclusive(self._tmp, dir_fd)
            with os.fdopen(fd, "wb") as file:
                file.write(payload)
            os.replace(self._tmp, self.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def withdraw(self) -> None:
        """Remove this child's file (it is shutting down)."""
        with contextlib.suppress(OSError), self.directory.opened() as dir_fd:
            for name in (self.name, self._tmp):
                _remove_own(name, dir_fd)


def read_children(directory: PublishDir, live_pids: list[int]) -> dict[str, dict[str, Any]]:
    """``{"<pid>": {"pools": stats, "totals": totals}}`` published by the live children.

    ``live_pids`` are the children alive now; a child that has not published
    yet has an empty entry. Raises :class:`UnsafeStatsDir` if the directory is
    not the one the worker created.
    """
    live = {str(pid) for pid in live_pids}
    found: dict[str, dict[str, Any]] = {}
    with directory.opened() as dir_fd:
        for name in os.listdir(dir_fd):
            match = _PUBLISHED.fullmatch(name) or _TEMPORARY.fullmatch(name)
            if match is None:
                continue  # not a name neopool writes: leave it alone
            pid = match.group(1)
            if pid not in live:
                _remove_own(name, dir_fd)  # a child that died; Celery has replaced it
            elif name.endswith(".json"):
                stats = _read_own(name, dir_fd)
                if stats is not None:
                    found[pid] = stats
    for pid in live:  # a child that has not published yet still counts
        found.setdefault(pid, {})
    return found


def _children(pool: Any) -> list[int]:
    """The pids of the worker's prefork children (none under threads/solo)."""
    me = os.getpid()
    info: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        info = dict(pool.info)
    return [int(pid) for pid in info.get("processes", ()) if int(pid) != me]


def _published(children: list[int], directory: PublishDir | None) -> dict[str, dict[str, Any]]:
    published: dict[str, dict[str, Any]] = {str(pid): {} for pid in children}
    if children and directory is not None:
        try:
            published = read_children(directory, children)
        except OSError as exc:  # refused (already logged) or gone
            logger.debug("neopool: could not read published pool stats: %s", exc)
    return published


def worker_stats(pool: Any, directory: PublishDir | None = None) -> dict[str, ProcessStats]:
    """What the ``neopool_stats`` command replies for this worker.

    ``pool`` is the worker's Celery task pool, ``directory`` where its prefork
    children publish. Their published stats, plus this process's own pools
    (the only ones under threads/solo).
    """
    children = _children(pool)
    result: dict[str, ProcessStats] = {}
    own = process_stats()
    if own or not children:
        result[str(os.getpid())] = own
    for pid, payload in _published(children, directory).items():
        pools = payload.get("pools", {})
        result[pid] = pools if isinstance(pools, dict) else {}
    return result


def worker_totals(pool: Any, directory: PublishDir | None = None) -> dict[str, ProcessTotals]:
    """What the ``neopool_totals`` command replies: :class:`ProcessTotals` per process.

    As :func:`worker_stats`: the prefork children's published totals, plus
    this process's own where it served a loop (always under threads/solo).
    """
    children = _children(pool)
    result: dict[str, ProcessTotals] = {}
    own = PROCESS.totals()
    if own["loops_served"] or not children:
        result[str(own["pid"])] = own
    for pid, payload in _published(children, directory).items():
        totals = payload.get("totals")
        result[pid] = totals if isinstance(totals, dict) else _zero_totals(int(pid))  # type: ignore[assignment]
    return result


def _publish_dir_of(app: Any) -> PublishDir | None:
    """The directory the worker of ``app`` created (set by :mod:`neopool.celery.lifecycle`)."""
    directory = getattr(getattr(app, "_neopool_lifecycle", None), "publish_dir", None)
    return directory if isinstance(directory, PublishDir) else None


def register_command() -> None:
    """Register ``neopool_stats`` with Celery's remote control (once per process)."""
    from celery.worker.control import Panel, inspect_command

    if COMMAND not in Panel.data:

        @inspect_command(name=COMMAND)  # type: ignore[untyped-decorator]
        def neopool_stats(state: Any) -> dict[str, ProcessStats]:
            """Pool stats of every event loop of every process of this worker."""
            consumer = state.consumer
            return worker_stats(consumer.pool, _publish_dir_of(consumer.app))

    if TOTALS_COMMAND not in Panel.data:

        @inspect_command(name=TOTALS_COMMAND)  # type: ignore[untyped-decorator]
        def neopool_totals(state: Any) -> dict[str, ProcessTotals]:
            """Loops served, drivers created and closed, borrows: per process of this worker."""
            consumer = state.consumer
            return worker_totals(consumer.pool, _publish_dir_of(consumer.app))


def cluster_stats(app: Any, timeout: float = 2.0) -> ClusterStats:
    """Pool stats of every event loop of every worker process in the cluster.

    Returns ``{worker node name: {"<pid>": {"<loop id>": PoolStats}}}``: one
    entry per worker that replied within ``timeout`` seconds; under it one
    entry per process that runs tasks (each prefork child, or the worker
    itself under threads/solo), and under that the stats of each event loop's
    pool in that process (empty before the first borrow). The same data as
    ``celery -A proj inspect neopool_stats``.
    """
    return _by_node(app, COMMAND, timeout)


def cluster_totals(app: Any, timeout: float = 2.0) -> ClusterTotals:
    """What every worker process in the cluster has done since it started.

    Returns ``{worker node name: {"<pid>": ProcessTotals}}``, the same data as
    ``celery -A proj inspect neopool_totals``. Beside :func:`cluster_stats`,
    which shows the live pools: where each task makes its own event loop,
    these counts (loops served, drivers created and closed) grow with every
    task while the live pools stay one per thread.
    """
    return _by_node(app, TOTALS_COMMAND, timeout)


def _by_node(app: Any, command: str, timeout: float) -> dict[str, Any]:
    """``{worker node name: reply}`` of the workers that answered ``command`` without error."""
    replies = app.control.broadcast(command, reply=True, timeout=timeout) or []
    merged: dict[str, Any] = {}
    for reply in replies:
        for node, payload in reply.items():
            if isinstance(payload, dict) and "error" not in payload:
                merged[node] = payload
    return merged
