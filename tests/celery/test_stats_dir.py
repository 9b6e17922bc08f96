"""Where prefork children publish their stats: a directory neopool made, or nothing.

Lifecycle contract, rule 7: neopool writes only inside a directory it created
itself, private (0700) and with an unpredictable name, and never follows or
trusts a pre-existing path in a shared directory. The stats directory used to be
``<tmp>/neopool-celery-<uid>/<parent pid>/``, created with ``exist_ok`` and
emptied with ``unlink``: a local user who created that path first (a link to a
directory of their choosing) made the worker delete and write files there.

The worker tests run real workers with ``TMPDIR`` pointing at a world-writable,
sticky directory of the test's own (a private ``/tmp``), so what a worker leaves
there can be listed exactly. The unit tests show what the publisher, the reader
and the clean-up refuse: raising :class:`UnsafeStatsDir`, with the reason logged
once, and touching nothing.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from celery_helpers import settled_stats
from neopool.celery import cluster_stats
from neopool.celery.stats import (
    DIR_PREFIX,
    PublishDir,
    StatsPublisher,
    UnsafeStatsDir,
    read_children,
)
from neopool.testing.worker_process import CeleryWorkerProcess
from polling import eventually

pytestmark = [pytest.mark.celery, pytest.mark.timeout(180)]

HERE = Path(__file__).resolve().parent
UID = os.geteuid()
TASKS = 20
#: What tells ``stats_dir_attack_app`` (the workers' app module) where to link.
VICTIM_ENV = "NEOPOOL_TEST_VICTIM"


# -- helpers -----------------------------------------------------------------------


@pytest.fixture
def shared_tmp(tmp_path: Path) -> Path:
    """A stand-in for ``/tmp``: world-writable and sticky, the workers' ``TMPDIR``."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


def old_path(shared: Path) -> Path:
    """Where the stats directory of every worker of this user used to be."""
    return shared / f"neopool-celery-{UID}"


def publish_dirs(shared: Path) -> set[Path]:
    """The stats directories in ``shared`` (not the old predictable path)."""
    return {
        path
        for path in shared.iterdir()
        if path.name.startswith(DIR_PREFIX) and path != old_path(shared)
    }


def worker_env(shared: Path, **extra: str) -> dict[str, str]:
    env = {"TMPDIR": str(shared), **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    return env


def assert_private_dir(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode), path  # a real directory, not a link
    assert st.st_uid == UID
    assert stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)


def send(app: Any, workspace: str, count: int = TASKS) -> None:
    results = [
        app.send_task("neopool.testing.ingest", args=[workspace, f"doc-{i}", 2])
        for i in range(count)
    ]
    assert all(result.get(timeout=120)["written"] == 2 for result in results)


def snapshot(directory: Path) -> dict[str, Any]:
    """Everything observable about a directory and its files."""
    st = directory.stat()
    files = {}
    for path in sorted(directory.iterdir()):
        entry = os.lstat(path)
        content = path.read_bytes() if stat.S_ISREG(entry.st_mode) else None
        files[path.name] = (content, entry.st_mode, entry.st_mtime_ns)
    return {"mode": st.st_mode, "mtime": st.st_mtime_ns, "files": files}


# -- real workers ----------------------------------------------------------------


def test_workers_publish_in_private_unpredictable_dirs_removed_at_shutdown(
    celery_app: Any,
    start_worker: Callable[..., CeleryWorkerProcess],
    queue: str,
    workspace: str,
    shared_tmp: Path,
) -> None:
    first = start_worker("prefork", 2, env=worker_env(shared_tmp))
    (first_dir,) = publish_dirs(shared_tmp)
    second = start_worker("prefork", 1, env=worker_env(shared_tmp), name=f"{queue}-second")
    (second_dir,) = publish_dirs(shared_tmp) - {first_dir}

    assert not os.path.lexists(old_path(shared_tmp))
    for directory in (first_dir, second_dir):
        assert_private_dir(directory)
        assert directory.parent == shared_tmp
        for worker in (first, second):
            assert str(worker.pid) not in directory.name  # nothing to guess it from
    assert first_dir != second_dir

    # Both workers' children publish there, and inspect reads it back.
    send(celery_app, workspace)

    def all_counted() -> bool:
        stats = cluster_stats(celery_app)
        borrows = sum(
            s["borrows"]
            for node in (first.nodename, second.nodename)
            for loops in stats.get(node, {}).values()
            for s in loops.values()
        )
        return borrows == TASKS

    assert eventually(all_counted, timeout=30)
    stats = cluster_stats(celery_app)
    for worker, directory, children in ((first, first_dir, 2), (second, second_dir, 1)):
        pids = set(stats[worker.nodename])
        assert len(pids) == children, stats
        assert str(worker.pid) not in pids, stats
        assert {path.name for path in directory.iterdir()} == {f"{pid}.json" for pid in pids}
        for path in directory.iterdir():
            st = os.lstat(path)
            assert stat.S_ISREG(st.st_mode)
            assert st.st_uid == UID
            assert stat.S_IMODE(st.st_mode) == 0o600
            published = json.loads(path.read_text())
            assert published["pools"] == stats[worker.nodename][path.stem]
            assert published["totals"]["pid"] == int(path.stem)

    assert first.stop() == 0
    assert second.stop() == 0
    assert list(shared_tmp.iterdir()) == []  # both directories and their files are gone


@pytest.mark.parametrize("attack", ["pid-link", "base-link"])
def test_prefork_worker_leaves_an_attackers_path_and_its_target_untouched(
    attack: str,
    celery_app: Any,
    start_worker: Callable[..., CeleryWorkerProcess],
    workspace: str,
    shared_tmp: Path,
    tmp_path: Path,
) -> None:
    """The old path is taken first: as a directory holding a link named after the
    worker's pid (``pid-link``), or as a link itself (``base-link``)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("do not touch")
    (victim / "4242.json").write_text('{"looks": "like a stats file"}')
    before = snapshot(victim)
    extra: dict[str, str] = {}
    if attack == "pid-link":
        old_path(shared_tmp).mkdir()
        extra[VICTIM_ENV] = str(victim)  # the app module links <old path>/<pid> to it
    else:
        old_path(shared_tmp).symlink_to(victim, target_is_directory=True)

    worker = start_worker(
        "prefork", 2, env=worker_env(shared_tmp, **extra), app_module="stats_dir_attack_app"
    )
    if attack == "pid-link":
        assert (old_path(shared_tmp) / str(worker.pid)).resolve() == victim.resolve()
    own_dirs = {path: os.lstat(path) for path in publish_dirs(shared_tmp)}

    send(celery_app, workspace)
    stats = settled_stats(celery_app, worker, TASKS)  # inspect answers, from both children
    running = snapshot(victim)
    assert worker.stop() == 0

    assert running == before  # nothing deleted, changed or added while it ran
    assert snapshot(victim) == before  # nor at shutdown
    assert sum(s["borrows"] for loops in stats.values() for s in loops.values()) == TASKS
    assert len(stats) == 2, stats
    assert str(worker.pid) not in stats, stats
    assert len(own_dirs) == 1, own_dirs  # it published in a directory of its own
    for st in own_dirs.values():
        assert stat.S_ISDIR(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o700
    assert publish_dirs(shared_tmp) == set()  # which is gone
    if attack == "pid-link":
        assert [p.name for p in old_path(shared_tmp).iterdir()] == [str(worker.pid)]
    else:
        assert old_path(shared_tmp).is_symlink()


@pytest.mark.parametrize(("pool", "concurrency"), [("threads", 2), ("solo", 1)])
def test_threads_and_solo_workers_leave_nothing_behind(
    pool: str,
    concurrency: int,
    celery_app: Any,
    start_worker: Callable[..., CeleryWorkerProcess],
    workspace: str,
    shared_tmp: Path,
) -> None:
    worker = start_worker(pool, concurrency, env=worker_env(shared_tmp))
    for directory in publish_dirs(shared_tmp):
        assert_private_dir(directory)
    send(celery_app, workspace, 5)
    stats = settled_stats(celery_app, worker, 5)
    assert list(stats) == [str(worker.pid)], stats  # the pools live in the main process
    assert worker.stop() == 0
    assert list(shared_tmp.iterdir()) == []


# -- unit level: what the publisher, the reader and the clean-up refuse --------------


@pytest.fixture
def own_tmp(shared_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process's temp directory is ``shared_tmp`` for the test."""
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    return shared_tmp


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "precious.txt").write_text("do not touch")
    return victim


def test_create_makes_a_private_directory_with_a_new_name_each_time(own_tmp: Path) -> None:
    old_umask = os.umask(0o077 | 0o200)  # a umask that would leave it unwritable
    try:
        first, second = PublishDir.create(), PublishDir.create()
    finally:
        os.umask(old_umask)
    assert first.path != second.path
    for directory in (first, second):
        assert directory.path.parent == own_tmp
        assert directory.path.name.startswith(DIR_PREFIX)
        assert_private_dir(directory.path)
        directory.remove()
    assert list(own_tmp.iterdir()) == []


def test_publish_read_withdraw_and_remove_in_a_sound_directory(own_tmp: Path) -> None:
    directory = PublishDir.create()
    publisher = StatsPublisher(directory)
    publisher.publish()
    publisher.publish()  # again: replaces the file
    path = directory.path / f"{os.getpid()}.json"
    assert [p.name for p in directory.path.iterdir()] == [path.name]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    published = json.loads(path.read_text())
    assert read_children(directory, [os.getpid()]) == {str(os.getpid()): published}
    publisher.withdraw()
    assert list(directory.path.iterdir()) == []
    directory.remove()
    assert not directory.path.exists()
    directory.remove()  # already gone: nothing to do


def refuses(directory: PublishDir, reason: str, victim: Path | None = None) -> None:
    """Publishing, withdrawing, reading and removing all refuse, and touch nothing."""
    before = snapshot(victim) if victim is not None else None
    with pytest.raises(UnsafeStatsDir, match=reason):
        StatsPublisher(directory).publish()
    with pytest.raises(UnsafeStatsDir, match=reason):
        read_children(directory, [os.getpid()])
    with pytest.raises(UnsafeStatsDir, match=reason):
        directory.remove()
    StatsPublisher(directory).withdraw()  # at shutdown: refused quietly
    if victim is not None:
        assert snapshot(victim) == before


@pytest.mark.parametrize("target", ["victim", "own directory"])
def test_refuses_a_symlink_in_place_of_the_directory(
    own_tmp: Path, victim: Path, tmp_path: Path, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    directory = PublishDir.create()
    moved = tmp_path / "moved"
    directory.path.rename(moved)
    directory.path.symlink_to(victim if target == "victim" else moved, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="neopool"):
        refuses(directory, "is a symbolic link", victim)
    assert directory.path.is_symlink()  # left as found
    assert list(moved.iterdir()) == []
    refusals = [r for r in caplog.records if "refusing the pool-stats directory" in r.message]
    assert len(refusals) == 1, caplog.text  # said once, not once per attempt


def test_refuses_a_group_or_world_writable_directory(own_tmp: Path) -> None:
    directory = PublishDir.create()
    StatsPublisher(directory).publish()
    for mode in (0o770, 0o707, 0o755):
        directory.path.chmod(mode)
        refuses(directory, f"has mode {mode:#o}")
        assert [p.name for p in directory.path.iterdir()] == [f"{os.getpid()}.json"]
    directory.path.chmod(0o700)
    directory.remove()  # sound again: usable again


def test_refuses_a_directory_owned_by_someone_else(own_tmp: Path) -> None:
    directory = PublishDir.create()
    mode, ino, dev, uid = stat.S_IFDIR | 0o700, directory.inode, directory.device, UID + 1
    fake = os.stat_result((mode, ino, dev, 2, uid, 0, 0, 0, 0, 0))
    assert directory.refusal(fake) == f"is owned by uid {UID + 1}, not {UID}"
    if UID != 0:
        pytest.skip("only root can give a directory away")
    os.chown(directory.path, 65534, 65534)
    refuses(directory, "is owned by uid 65534")


def test_refuses_a_directory_replaced_by_another(own_tmp: Path, tmp_path: Path) -> None:
    directory = PublishDir.create()
    directory.path.rename(tmp_path / "moved")  # (still there: its inode is not reused)
    directory.path.mkdir(mode=0o700)  # same name, same owner and mode: not the one created
    (directory.path / "1.json").write_text("{}")
    refuses(directory, "was replaced")
    assert [p.name for p in directory.path.iterdir()] == ["1.json"]


def test_reader_ignores_links_and_special_files_and_removes_only_its_own(
    own_tmp: Path, victim: Path
) -> None:
    directory = PublishDir.create()
    outside = victim / "stats.json"
    outside.write_text(json.dumps({"loop": {"borrows": 99}}))
    before = snapshot(victim)
    live_link, live_fifo, dead_link, dead_file = 101, 102, 103, 104
    (directory.path / f"{live_link}.json").symlink_to(outside)
    os.mkfifo(directory.path / f"{live_fifo}.json", 0o600)  # opening must not block
    (directory.path / f"{dead_link}.json").symlink_to(victim / "precious.txt")
    (directory.path / f"{dead_file}.json").write_text("{}")
    (directory.path / "notes.txt").write_text("not ours to remove")

    found = read_children(directory, [live_link, live_fifo])
    assert found == {str(live_link): {}, str(live_fifo): {}}  # nothing read through them
    left = {p.name for p in directory.path.iterdir()}
    assert left == {f"{live_link}.json", f"{live_fifo}.json", f"{dead_link}.json", "notes.txt"}
    with pytest.raises(OSError, match="not empty"):
        directory.remove()  # removes only what neopool writes, so the directory stays
    assert {p.name for p in directory.path.iterdir()} == {
        f"{live_link}.json",
        f"{live_fifo}.json",
        f"{dead_link}.json",
        "notes.txt",
    }
    assert snapshot(victim) == before


def test_publisher_never_writes_through_a_planted_file(own_tmp: Path, victim: Path) -> None:
    """A link at the publisher's temporary or final name is replaced, never followed."""
    directory = PublishDir.create()
    publisher = StatsPublisher(directory)
    before = snapshot(victim)
    (directory.path / f".{os.getpid()}.json.tmp").symlink_to(victim / "precious.txt")
    (directory.path / f"{os.getpid()}.json").symlink_to(victim / "precious.txt")
    publisher.publish()
    path = directory.path / f"{os.getpid()}.json"
    assert not path.is_symlink()
    assert isinstance(json.loads(path.read_text()), dict)
    assert snapshot(victim) == before
    publisher.withdraw()
    directory.remove()
