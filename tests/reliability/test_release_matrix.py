"""Every way a loop ends, for every loop kind (asyncio, uvloop) and transport (plain, TLS).

The contract (design note, "Lifecycle contract", rules 2-4): a loop that can never
run again has its sockets released at the next registry access or garbage
collection, without sending a byte; a forked child starts empty and lets go of its
copies of the parent's sockets; a lease held by a task that dies with its loop
comes back with one warning and no traceback; a close over TLS is bounded even
when the server stops answering; a process exits promptly whatever state its
loops are in.

Each test checks effects: the server side of a connection (the proxy's count of
live connections), the descriptors in ``/proc/self/fd``, what a child wrote to its
stderr, how long an interpreter took to exit. The figures asked for in the
closing note (inherited sockets left open in a forked child, exit times) are
printed and written to ``results/release_matrix.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import multiprocessing
import os
import stat
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from neo4j import AsyncDriver

from neopool import (
    GlobalNeo4jConnectionPool,
    Neo4jConnectionConfig,
    Neo4jConnectionFactory,
    _release,
)
from neopool.runner import close_all_loops
from neopool.testing import BoltTarget, TcpProxy
from polling import eventually, eventually_async

from .conftest import open_fds

if sys.version_info >= (3, 11):
    from asyncio import Runner
else:  # pragma: no cover - exercised on 3.10 only
    from backports.asyncio.runner import Runner

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dev dependency
    uvloop = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd"),
    # Forking a process that has threads is the point: Celery prefork does it (3.12+ warns).
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

LOOP_KINDS: dict[str, LoopFactory] = {"asyncio": asyncio.new_event_loop}
if uvloop is not None:
    LOOP_KINDS["uvloop"] = uvloop.new_event_loop

RESULTS = Path(__file__).resolve().parents[2] / "results" / "release_matrix.json"
CHILD_SCRIPT = Path(__file__).with_name("exit_with_loops_in_every_state.py")
#: What a clean exit must never print.
PROBLEMS = ("Traceback", "Exception ignored")
#: How long a process with loops in every state may take to exit.
EXIT_BOUND_S = 20.0


# -- parameters and fixtures -----------------------------------------------------------
@pytest.fixture(
    params=[
        "asyncio",
        pytest.param("uvloop", marks=pytest.mark.skipif(uvloop is None, reason="needs uvloop")),
    ]
)
def loop_kind(request: pytest.FixtureRequest) -> str:
    """The kind of event loop the user creates."""
    return str(request.param)


@pytest.fixture(params=["plain", "tls"])
def proxy(request: pytest.FixtureRequest) -> TcpProxy:
    """What the driver connects through: a plain TCP proxy or a TLS-terminating one."""
    name = "neopool_proxy" if request.param == "plain" else "neopool_tls_proxy"
    fixture: TcpProxy = request.getfixturevalue(name)
    return fixture


@pytest.fixture
def config(
    configure: Callable[..., Neo4jConnectionConfig], proxy: TcpProxy
) -> Iterator[Neo4jConnectionConfig]:
    """The registry configured through ``proxy``, with two warm sockets per loop."""
    yield configure(uri=proxy.uri(), pool_min_size=2, pool_max_size=4, close_timeout=2.0)
    close_all_loops(10)


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    return LOOP_KINDS[kind]()


async def query(value: int) -> int:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        records, _, _ = await driver.execute_query(
            "RETURN $value AS value", value=value, database_="neo4j"
        )
        return int(records[0]["value"])


def warm_up(kind: str) -> None:
    """One graceful round on a loop of ``kind``, so one-time allocations precede a count."""
    with Runner(loop_factory=LOOP_KINDS[kind]) as runner:
        assert runner.run(query(0)) == 0
    gc.collect()


def live_ids(proxy: TcpProxy) -> set[int]:
    """The proxy's connections open now (the server's view)."""
    return {int(s["id"]) for s in proxy.connection_stats() if s["open"]}


def record(section: str, key: str, value: Any) -> None:
    """Keep a figure for the closing note: printed, and merged into results/release_matrix.json."""
    print(f"[release-matrix] {section} {key}: {value}")
    RESULTS.parent.mkdir(exist_ok=True)
    try:
        figures = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        figures = {}
    figures.setdefault(section, {})[key] = value
    RESULTS.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


# -- sockets as the kernel sees them ---------------------------------------------------
def nothing_left(proxy: TcpProxy, fds_before: int) -> None:
    """The server sees no connection, no descriptor is left open, no pool is registered."""
    assert eventually(lambda: proxy.active_connections == 0)
    gc.collect()
    assert eventually(lambda: open_fds() <= fds_before), (fds_before, open_links())
    assert GlobalNeo4jConnectionPool().pools() == []


def driver_sockets(driver: AsyncDriver) -> dict[int, str]:
    """``{fd: "socket:[inode]"}`` of the driver's sockets, found as _release finds them."""
    sockets: dict[int, str] = {}
    for transport in _release._transports(driver):
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        if fd >= 0:
            sockets[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return sockets


def open_links() -> dict[int, str]:
    """``{fd: what it points at}`` for every descriptor of this process."""
    links: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            links[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return links


def still_sockets(inherited: dict[int, str]) -> dict[str, Any]:
    """In a forked child: which of the parent's driver sockets this process still holds."""
    targets = set(inherited.values())
    holding = sorted(fd for fd, link in open_links().items() if link in targets)
    numbers: dict[str, str] = {}
    for fd in inherited:
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            numbers[str(fd)] = "closed"
            continue
        kind = "socket" if stat.S_ISSOCK(mode) else "not a socket"
        numbers[str(fd)] = f"{kind}: {os.readlink(f'/proc/self/fd/{fd}')}"
    return {"holding": holding, "numbers": numbers}


# -- 1. fork ---------------------------------------------------------------------------
@contextlib.contextmanager
def child_stderr_into(write_fd: int) -> Iterator[None]:
    """While forking: a child's stderr (fd 2, ``sys.stderr``, the default unraisable hook)
    goes to ``write_fd``, from the at-fork hooks on; the parent's is restored after."""
    sys.stderr.flush()
    saved_fd = os.dup(2)
    saved_stream, saved_hook = sys.stderr, sys.unraisablehook
    os.dup2(write_fd, 2)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 - the child's
    sys.unraisablehook = sys.__unraisablehook__  # pytest's would keep it to itself
    try:
        yield
    finally:
        sys.stderr, sys.unraisablehook = saved_stream, saved_hook
        os.dup2(saved_fd, 2)
        os.close(saved_fd)


def read_all(fd: int) -> str:
    with os.fdopen(fd, "rb") as pipe:
        return pipe.read().decode(errors="replace")


def child_work(kind: str, inherited: dict[int, str]) -> dict[str, Any]:
    """What the forked child checks and does; returns its report."""
    registry = GlobalNeo4jConnectionPool()
    report: dict[str, Any] = {
        "pools_at_start": len(registry.pools()),
        "left_to_sweep": registry.sweep(),
        "at_start": still_sockets(inherited),
    }
    with Runner(loop_factory=LOOP_KINDS[kind]) as runner:
        report["value"] = runner.run(query(42))
        report["loop_type"] = type(runner.get_loop()).__module__
    gc.collect()  # any finalizer of an inherited driver or socket runs now, in the child
    report["at_end"] = still_sockets(inherited)
    report["pools_at_end"] = len(registry.pools())
    sys.stderr.flush()
    return report


def fork_with_os_fork(kind: str, inherited: dict[int, str]) -> tuple[dict[str, Any], str]:
    report_r, report_w = os.pipe()
    err_r, err_w = os.pipe()
    with child_stderr_into(err_w):
        pid = os.fork()
        if pid == 0:  # the child
            status = 1
            try:
                os.close(report_r)
                os.close(err_r)
                payload = json.dumps(child_work(kind, inherited))
                with os.fdopen(report_w, "w") as pipe:
                    pipe.write(payload)
                status = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(status)
    os.close(report_w)
    os.close(err_w)
    payload = read_all(report_r)
    errors = read_all(err_r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"the child failed:\n{errors}"
    report: dict[str, Any] = json.loads(payload)
    return report, errors


def _child_via_multiprocessing(queue: Any, kind: str, inherited: dict[int, str]) -> None:
    queue.put(child_work(kind, inherited))


def fork_with_multiprocessing(kind: str, inherited: dict[int, str]) -> tuple[dict[str, Any], str]:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    err_r, err_w = os.pipe()
    process = context.Process(target=_child_via_multiprocessing, args=(queue, kind, inherited))
    with child_stderr_into(err_w):
        process.start()
    os.close(err_w)
    try:
        report: dict[str, Any] = queue.get(timeout=60)
    finally:
        process.join(60)
    errors = read_all(err_r)
    assert process.exitcode == 0, f"the child failed:\n{errors}"
    return report, errors


FORKS = {"os.fork": fork_with_os_fork, "multiprocessing": fork_with_multiprocessing}


@pytest.mark.parametrize("fork", list(FORKS))
def test_a_forked_child_lets_go_of_every_inherited_socket_and_the_parent_keeps_them(
    config: Neo4jConnectionConfig,
    proxy: TcpProxy,
    loop_kind: str,
    fork: str,
    request: pytest.FixtureRequest,
    unraisable: list[Any],
) -> None:
    loop = new_loop(loop_kind)
    try:
        assert loop.run_until_complete(query(5)) == 5  # a warm pool on an open, idle loop
        (pool,) = GlobalNeo4jConnectionPool().pools()
        assert pool.driver is not None
        inherited = driver_sockets(pool.driver)
        parents = {s["id"]: s["bytes_up"] for s in proxy.connection_stats() if s["open"]}
        assert len(inherited) == len(parents) == 2, (inherited, parents)  # pool_min_size

        report, errors = FORKS[fork](loop_kind, inherited)

        left_open = len(report["at_start"]["holding"])
        record("fork_inherited_sockets_left_open", request.node.callspec.id, left_open)
        assert not any(problem in errors for problem in PROBLEMS), errors
        assert report["pools_at_start"] == 0  # the registry is empty in the child
        assert report["left_to_sweep"] == 0  # and holds nothing still to end
        assert left_open == 0, report["at_start"]
        assert report["at_end"]["holding"] == []
        assert all(not n.startswith("socket") for n in report["at_start"]["numbers"].values())
        assert report["value"] == 42  # the child borrows on sockets of its own
        assert report["loop_type"].startswith(loop_kind)
        assert report["pools_at_end"] == 0

        # The server still sees the parent's connections, untouched by the child ...
        after = {s["id"]: s for s in proxy.connection_stats()}
        for conn_id, bytes_up in parents.items():
            assert after[conn_id]["open"] == 1, "the child closed a parent's connection"
            assert after[conn_id]["bytes_up"] == bytes_up, "the child wrote on a parent's socket"
        assert set(after) - set(parents), "the child should have opened connections of its own"
        assert eventually(lambda: live_ids(proxy) == set(parents))  # the child's are gone
        # ... and the parent's pool works on them.
        opened = proxy.connections_opened
        assert loop.run_until_complete(query(7)) == 7
        assert proxy.connections_opened == opened
        assert live_ids(proxy) == set(parents)
    finally:
        loop.run_until_complete(GlobalNeo4jConnectionPool().close_all_pools())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    assert eventually(lambda: proxy.active_connections == 0)


# -- 2. a loop closed without teardown ------------------------------------------------
@pytest.mark.parametrize("access", ["sweep", "borrow elsewhere", "gc"])
def test_a_loop_closed_without_teardown_leaves_no_connection_and_no_descriptor(
    config: Neo4jConnectionConfig,
    proxy: TcpProxy,
    loop_kind: str,
    access: str,
    unraisable: list[Any],
) -> None:
    warm_up(loop_kind)
    before = open_fds()
    loop = new_loop(loop_kind)
    assert loop.run_until_complete(query(1)) == 1
    ours = live_ids(proxy)
    assert len(ours) == 2  # pool_min_size
    loop.close()  # no shutdown_asyncgens, no close_all_pools

    if access == "gc":
        del loop
        gc.collect()
    else:
        gc.disable()  # so the registry, not the collector, is what lets go
        try:
            if access == "sweep":
                GlobalNeo4jConnectionPool().sweep()
                assert eventually(lambda: proxy.active_connections == 0)
            else:

                async def borrow_and_look() -> bool:
                    assert await query(2) == 2  # a borrow on another loop: a registry access
                    return eventually(lambda: not live_ids(proxy) & ours)

                with Runner(loop_factory=LOOP_KINDS[loop_kind]) as runner:
                    assert runner.run(borrow_and_look()), "the closed loop's sockets stayed open"
        finally:
            gc.enable()
        del loop
    nothing_left(proxy, before)


def test_a_loop_closed_while_a_task_holds_a_lease_leaves_no_connection_and_no_traceback(
    config: Neo4jConnectionConfig,
    proxy: TcpProxy,
    loop_kind: str,
    caplog: pytest.LogCaptureFixture,
    unraisable: list[Any],
) -> None:
    """The task is destroyed with its loop; its coroutine is closed by the collector, off
    any loop, and leaving ``async with`` there must not raise (the lease comes back as a
    lost one)."""
    warm_up(loop_kind)
    before = open_fds()

    async def hold(started: asyncio.Event) -> None:
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            driver = await borrowed.get_driver()
            await driver.execute_query("RETURN 1", database_="neo4j")
            started.set()
            await asyncio.Event().wait()  # until the loop goes away

    async def spawn_a_holder() -> None:
        started = asyncio.Event()
        asyncio.get_running_loop().create_task(hold(started))
        await started.wait()

    loop = new_loop(loop_kind)
    loop.run_until_complete(spawn_a_holder())
    assert proxy.active_connections == 2  # pool_min_size
    loop.close()  # the holder's task is still pending
    del loop
    caplog.set_level(logging.WARNING, logger="neopool")
    gc.collect()  # the task is destroyed: its coroutine is closed here, off any loop
    lost = [r.getMessage() for r in caplog.records if "never returned" in r.getMessage()]
    assert len(lost) == 1, lost  # one warning ...
    assert " in hold." in lost[0]  # ... naming where the lease was borrowed
    GlobalNeo4jConnectionPool().sweep()  # the next registry access
    nothing_left(proxy, before)


# -- 3. a thread that ends without closing its loop ----------------------------------
def test_a_thread_that_ends_without_closing_its_loop_leaves_no_connection_and_no_descriptor(
    config: Neo4jConnectionConfig,
    proxy: TcpProxy,
    loop_kind: str,
    request: pytest.FixtureRequest,
    unraisable: list[Any],
) -> None:
    warm_up(loop_kind)
    before = open_links()
    opened = proxy.connections_opened
    results: list[int] = []
    dropped: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    def celery_style_thread() -> None:
        loop = new_loop(loop_kind)
        dropped.append(weakref.ref(loop))
        results.append(loop.run_until_complete(query(1)))  # and the thread ends, loop open

    thread = threading.Thread(target=celery_style_thread)
    thread.start()
    thread.join(30)
    assert results == [1]
    assert proxy.connections_opened - opened == 2  # pool_min_size
    assert eventually(lambda: proxy.active_connections == 0)
    assert GlobalNeo4jConnectionPool().pools() == []

    def left_over() -> dict[int, str]:
        gc.collect()
        return {fd: link for fd, link in open_links().items() if before.get(fd) != link}

    def sockets(leftover: dict[int, str]) -> list[str]:
        return [link for link in leftover.values() if link.startswith("socket:")]

    assert eventually(lambda: not sockets(left_over())), left_over()
    if loop_kind == "asyncio":
        assert eventually(lambda: not left_over()), left_over()
    leftover = left_over()
    record("thread_ended_fds_left_after_gc", request.node.callspec.id, sorted(leftover.values()))
    if loop_kind == "asyncio":
        assert dropped[0]() is None, "the dropped loop was kept alive"
        assert leftover == {}
        return
    # A uvloop loop that is never closed is never collected: its libuv handles keep
    # themselves (and the loop) alive until loop.close(), so it keeps its own
    # descriptors (epoll, io_uring, wake-up pipe, eventfd) and the numbers of the
    # released sockets, pointed at /dev/null, for as long as the process lives.
    # Everything left over is that loop's: closing it gives every descriptor back.
    loop = dropped[0]()
    assert loop is not None
    loop.close()
    del loop
    assert eventually(lambda: not left_over()), left_over()


# -- 4. a process that exits with loops in every state -------------------------------
@pytest.mark.timing
@pytest.mark.parametrize(
    ("kind", "transport"),
    [("asyncio", "plain"), ("uvloop", "plain"), ("asyncio", "tls"), ("uvloop", "tls")],
)
def test_a_process_with_loops_in_every_state_exits_promptly_and_cleanly(
    neopool_bolt: BoltTarget, request: pytest.FixtureRequest, kind: str, transport: str
) -> None:
    if kind not in LOOP_KINDS:
        pytest.skip("needs uvloop")
    proxy: TcpProxy = request.getfixturevalue(
        "neopool_proxy" if transport == "plain" else "neopool_tls_proxy"
    )
    env = {
        **os.environ,
        "NEO4J_URI": proxy.uri(),
        "NEO4J_USERNAME": neopool_bolt.username,
        "NEO4J_PASSWORD": neopool_bolt.password,
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(CHILD_SCRIPT), kind],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    ended = time.monotonic()
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    exit_s = round(ended - report["main_returned_at"], 3)
    record("exit_seconds_after_main_returned", f"{kind}-{transport}", exit_s)
    record("child_total_seconds", f"{kind}-{transport}", round(ended - started, 3))

    states = (
        "ended_worker",
        "live_worker",
        "main",
        "daemon_forever",
        "closed_without_teardown",
        "thread_never_closed",
    )
    assert {state: report.get(state) for state in states} == dict.fromkeys(states, 1), report
    assert report["loop_type"].startswith(kind)
    assert proxy.connections_opened >= 2 * len(states)  # every loop had its warm sockets
    assert not any(problem in done.stderr for problem in PROBLEMS), done.stderr
    assert exit_s < EXIT_BOUND_S
    assert eventually(lambda: proxy.active_connections == 0)


# -- 5. a graceful close over TLS, the server answering or not -------------------------
@pytest.mark.parametrize("server", ["answering", "silent"])
def test_a_pool_close_over_tls_leaves_no_socket_open_within_its_timeout(
    configure: Callable[..., Neo4jConnectionConfig],
    neopool_tls_proxy: TcpProxy,
    loop_kind: str,
    server: str,
    unraisable: list[Any],
) -> None:
    """``close(timeout)`` is bounded: when it returns, or soon after while the loop runs,
    the pool's sockets are closed in this process, even if the server stops answering.

    The driver's ``close()`` only starts each socket's close (``StreamWriter.close``)
    and forgets the connection; over TLS the transport then waits for the server's
    ``close_notify``, up to ``ssl_shutdown_timeout`` (30 s), and a loop closed
    meanwhile leaves the socket to the garbage collector. A silent server must
    instead see its sockets aborted when the close runs out of time. TLS only: a
    plain socket's close needs no answer from the peer.
    """
    proxy = neopool_tls_proxy
    configure(uri=proxy.uri(), pool_min_size=2, close_timeout=0.5)

    async def close_and_look() -> bool:
        assert await query(1) == 1
        pool = await GlobalNeo4jConnectionPool().get_pool()
        assert pool.driver is not None
        ours = set(driver_sockets(pool.driver).values())
        assert len(ours) == 2  # pool_min_size
        proxy.set_blackhole(server == "silent")
        await pool.close(timeout=0.5)
        # Ten times the close's budget, the loop running meanwhile.
        return await eventually_async(lambda: not ours & set(open_links().values()), 5.0)

    try:
        with Runner(loop_factory=LOOP_KINDS[loop_kind]) as runner:
            assert runner.run(close_and_look()), "the pool's sockets outlived its close"
    finally:
        proxy.set_blackhole(False)
    assert eventually(lambda: proxy.active_connections == 0)
