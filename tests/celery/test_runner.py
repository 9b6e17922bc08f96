"""neopool.run: one loop per thread or one per process, reused, closed cleanly, interruptible."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

import neopool
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory, runner
from neopool._release import driver_is_closed
from neopool.runner import LoopAlreadyRunning, close_thread_loop
from neopool.testing import BoltTarget, TcpProxy
from polling import eventually, eventually_async
from signals import PROMPTLY, Interrupted, signalled_elsewhere
from user_code import WorkerThread

T = TypeVar("T")

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def registry(neopool_registry: GlobalNeo4jConnectionPool) -> Iterator[GlobalNeo4jConnectionPool]:
    yield neopool_registry
    close_thread_loop()


async def borrow_once() -> tuple[int, int]:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        async with driver.session(database=await borrowed.prepare_database("runner")) as s:
            await (await s.run("RETURN 1")).consume()
    return id(asyncio.get_running_loop()), id(driver)


def test_calls_in_one_thread_share_its_loop_and_driver(
    registry: GlobalNeo4jConnectionPool,
) -> None:
    first = neopool.run(borrow_once())
    second = neopool.run(borrow_once())
    assert first == second
    (pool,) = registry.pools()
    assert pool.stats()["drivers_created"] == 1
    assert pool.stats()["borrows"] == 2


def test_each_thread_has_its_own_loop_closed_when_the_thread_ends(
    registry: GlobalNeo4jConnectionPool,
) -> None:
    seen: list[Any] = []

    def work() -> None:
        seen.append(neopool.run(borrow_once()))
        seen.append(neopool.run(borrow_once()))
        (pool,) = [p for p in registry.pools() if p.loop is neopool.runner.thread_loop()]
        seen.append(pool)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen[0] == seen[1]
    assert seen[0][0] != neopool.run(borrow_once())[0]
    pool = seen[2]
    assert pool.closed
    assert pool.driver is not None
    assert driver_is_closed(pool.driver)  # by driver.close(), on its own loop, as the thread ended
    assert pool.loop is not None
    assert pool.loop.is_closed()
    assert pool not in registry.pools()


def test_close_thread_loop_closes_the_pool_and_a_new_loop_follows(
    registry: GlobalNeo4jConnectionPool,
) -> None:
    neopool.run(borrow_once())
    (pool,) = registry.pools()
    close_thread_loop()
    assert pool.closed
    assert pool.driver is not None
    assert driver_is_closed(pool.driver)  # by driver.close(), on the loop, before it closed
    assert pool.loop is not None
    assert pool.loop.is_closed()
    neopool.run(borrow_once())
    (new_pool,) = registry.pools()
    assert new_pool is not pool


@pytest.mark.timing
def test_close_thread_loop_inside_run_returns_at_once_and_the_loop_closes_after_the_call(
    registry: GlobalNeo4jConnectionPool,
) -> None:
    async def borrow_then_close() -> tuple[asyncio.AbstractEventLoop, Any]:
        await borrow_once()
        loop = asyncio.get_running_loop()
        (pool,) = [p for p in registry.pools() if p.loop is loop]
        close_thread_loop()  # this thread runs the loop: it cannot wait for it to be free
        return loop, pool

    started = time.monotonic()
    loop, pool = neopool.run(borrow_then_close())
    assert time.monotonic() - started < 2.0  # not its own lock's timeout, then the finaliser's
    assert loop.is_closed()  # by run(), once the call returned
    assert pool.closed
    assert driver_is_closed(pool.driver)  # gracefully, on the loop, before it closed
    assert pool not in registry.pools()
    new_loop_id, _ = neopool.run(borrow_once())
    assert new_loop_id != id(loop)
    assert runner.thread_loop() is not loop
    assert not runner.thread_loop().is_closed()
    (new_pool,) = registry.pools()
    assert new_pool is not pool


def test_close_thread_loop_asked_by_code_not_run_through_run_is_not_lost(
    registry: GlobalNeo4jConnectionPool,
) -> None:
    """Code run on the thread's loop some other way asks to close it: the loop
    stays registered and is closed by the next run() or, failing that, as the
    thread ends; it is never left open and unowned."""

    async def borrow_then_close() -> Any:
        await borrow_once()
        loop = asyncio.get_running_loop()
        (pool,) = [p for p in registry.pools() if p.loop is loop]
        close_thread_loop()
        return pool

    def close_asked() -> tuple[asyncio.AbstractEventLoop, Any]:
        loop = runner.thread_loop()
        pool = loop.run_until_complete(borrow_then_close())
        assert not loop.is_closed()  # nothing has run it through run() yet
        return loop, pool

    first = WorkerThread("next-run-closes-it")
    loop, pool = first.call(close_asked)
    first.call(lambda: neopool.run(borrow_once()))
    assert loop.is_closed()
    assert driver_is_closed(pool.driver)
    assert first.call(runner.thread_loop) is not loop
    first.end()

    second = WorkerThread("thread-end-closes-it")
    loop, pool = second.call(close_asked)
    second.end()
    assert loop.is_closed()
    assert pool.closed
    assert driver_is_closed(pool.driver)
    assert pool not in registry.pools()


@pytest.mark.timing
def test_close_all_loops_inside_run_does_not_wait_for_its_own_loop(
    registry: GlobalNeo4jConnectionPool,
) -> None:
    async def borrow_then_close_all() -> tuple[asyncio.AbstractEventLoop, Any, float]:
        await borrow_once()
        loop = asyncio.get_running_loop()
        (pool,) = [p for p in registry.pools() if p.loop is loop]
        started = time.monotonic()
        runner.close_all_loops(timeout=3.0)  # its own loop is busy running this very call
        return loop, pool, time.monotonic() - started

    loop, pool, took = neopool.run(borrow_then_close_all())
    assert took < 1.0, f"close_all_loops waited {took:.2f} s for the loop running it"
    assert loop.is_closed()  # by run(), once the call returned
    assert pool.closed
    assert driver_is_closed(pool.driver)
    new_loop_id, _ = neopool.run(borrow_once())
    assert new_loop_id != id(loop)


def test_run_inside_a_running_loop_is_a_clear_error() -> None:
    async def nested() -> None:
        neopool.run(asyncio.sleep(0))

    with pytest.raises(LoopAlreadyRunning, match="Await the coroutine instead"):
        asyncio.run(nested())


def test_an_interrupt_cancels_the_coroutine_and_returns_its_lease(
    registry: GlobalNeo4jConnectionPool,
) -> None:
    holding = threading.Event()

    async def hold() -> None:
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            await borrowed.get_driver()
            holding.set()
            await asyncio.sleep(30)  # a long task, interrupted while it holds the lease

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    def interrupt_once_holding() -> None:  # as Celery's soft time limit fires mid-task
        if holding.wait(30):
            os.kill(os.getpid(), signal.SIGALRM)

    previous = signal.signal(signal.SIGALRM, interrupt)
    interrupter = threading.Thread(target=interrupt_once_holding)
    try:
        interrupter.start()
        with pytest.raises(Interrupted):
            neopool.run(hold())
    finally:
        holding.set()  # the interrupter stops waiting, whatever happened
        interrupter.join(30)
        signal.signal(signal.SIGALRM, previous)
    (pool,) = registry.pools()
    assert pool.stats()["in_use"] == 0
    neopool.run(borrow_once())  # the loop still works
    assert pool.stats()["drivers_created"] == 1


async def hold_a_lease_forever(holding: threading.Event, cancelled: list[float]) -> None:
    """Borrow, then wait for an answer that never comes (a query the server never answers)."""
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        await (await borrowed.get_driver()).verify_connectivity()
        holding.set()
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            cancelled.append(time.monotonic())
            raise


def interrupt_a_lease_holder_from_elsewhere(wake: Callable[[], object]) -> None:
    """``neopool.run`` in the main thread of a call that holds a lease for ever; a signal
    sent from another thread (:func:`signalled_elsewhere`) must raise out of the call and
    reach its coroutine within ``PROMPTLY`` s."""
    holding = threading.Event()
    cancelled: list[float] = []
    with signalled_elsewhere(holding, wake) as sent:
        with pytest.raises(Interrupted):
            neopool.run(hold_a_lease_forever(holding, cancelled))
        raised = time.monotonic()
    (sent_at,) = sent
    assert raised - sent_at < PROMPTLY
    assert cancelled
    assert cancelled[0] - sent_at < PROMPTLY  # it reached the coroutine


needs_sigmask = pytest.mark.skipif(
    not hasattr(signal, "pthread_sigmask"), reason="needs signal.pthread_sigmask (POSIX)"
)


@needs_sigmask
@pytest.mark.timing
def test_a_signal_delivered_to_another_thread_interrupts_the_main_threads_call_at_once(
    registry: GlobalNeo4jConnectionPool,
) -> None:
    loop = runner.thread_loop()  # the main thread's
    interrupt_a_lease_holder_from_elsewhere(lambda: loop.call_soon_threadsafe(lambda: None))
    (pool,) = registry.pools()
    assert pool.stats()["in_use"] == 0
    assert neopool.run(borrow_once())[0] == id(loop)  # the loop still works, and still wakes
    assert pool.stats()["drivers_created"] == 1


# -- the process loop -------------------------------------------------------------------


@pytest.fixture
def process_loop(
    neopool_bolt: BoltTarget, neopool_proxy: TcpProxy, registry: GlobalNeo4jConnectionPool
) -> Iterator[TcpProxy]:
    """Process-loop mode for one test, through a counting proxy; closed and undone after it."""
    GlobalNeo4jConnectionPool.set_config(neopool_bolt.config(uri=neopool_proxy.uri()))
    runner.use_process_loop()
    try:
        yield neopool_proxy
    finally:
        runner.use_process_loop(False)
        assert runner.close_process_loop(10)
        assert runner.calls_in_flight() == 0


async def hold_lease(seconds: float, holding: threading.Event | None = None) -> str:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        await (await borrowed.get_driver()).verify_connectivity()
        if holding is not None:
            holding.set()
        await asyncio.sleep(seconds)
    return threading.current_thread().name


def in_threads(count: int, work: Callable[[], T]) -> list[concurrent.futures.Future[T]]:
    pool = concurrent.futures.ThreadPoolExecutor(count)
    futures = [pool.submit(work) for _ in range(count)]
    pool.shutdown(wait=False)
    return futures


@pytest.mark.timing
def test_calls_from_many_threads_run_at_once_on_the_process_loop_sharing_one_driver(
    process_loop: TcpProxy, registry: GlobalNeo4jConnectionPool
) -> None:
    started = time.monotonic()
    calls = in_threads(8, lambda: neopool.run(hold_lease(0.5)))
    assert {call.result(30) for call in calls} == {runner.PROCESS_LOOP_THREAD}
    assert time.monotonic() - started < 8 * 0.5 / 2  # at once, not one after the other
    (pool,) = registry.pools()
    assert pool.loop is runner.process_loop()
    assert pool.stats()["thread"] == runner.PROCESS_LOOP_THREAD
    assert pool.stats()["borrows"] == 8
    assert pool.stats()["drivers_created"] == 1
    assert runner.loops() == {runner.PROCESS_LOOP_THREAD: runner.process_loop()}
    assert process_loop.connections_opened <= 8 + pool.stats()["min_size"]


def test_each_call_on_the_process_loop_cancels_only_what_it_left_behind(
    process_loop: TcpProxy,
) -> None:
    left_behind_cancelled = threading.Event()
    other_child_done = threading.Event()
    other_running = threading.Event()

    async def leave_behind() -> None:
        async def background() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                left_behind_cancelled.set()

        asyncio.get_running_loop().create_task(background())
        await asyncio.sleep(0.1)

    async def other() -> None:
        async def child() -> None:
            await asyncio.sleep(1.0)
            other_child_done.set()

        task = asyncio.get_running_loop().create_task(child())
        other_running.set()
        await task

    (other_call,) = in_threads(1, lambda: neopool.run(other()))
    assert other_running.wait(10)
    neopool.run(leave_behind())
    assert left_behind_cancelled.is_set()  # before run() returned
    other_call.result(10)  # its spawned task was not touched by the other call's end
    assert other_child_done.is_set()


def test_an_interrupted_wait_cancels_only_that_call_and_returns_its_lease(
    process_loop: TcpProxy, registry: GlobalNeo4jConnectionPool
) -> None:
    other_holding = threading.Event()
    (other,) = in_threads(1, lambda: neopool.run(hold_lease(1.5, other_holding)))
    assert other_holding.wait(10)
    holding = threading.Event()

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Interrupted):
            neopool.run(hold_lease(30, holding))  # waits in the main thread
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert holding.is_set()
    (pool,) = registry.pools()
    assert pool.stats()["in_use"] == 1  # the interrupted call's lease is back; the other holds
    assert other.result(10) == runner.PROCESS_LOOP_THREAD
    assert pool.stats()["in_use"] == 0
    assert pool.stats()["drivers_created"] == 1


@needs_sigmask
@pytest.mark.timing
def test_a_signal_delivered_to_another_thread_interrupts_the_main_threads_wait_at_once(
    process_loop: TcpProxy, registry: GlobalNeo4jConnectionPool
) -> None:
    interrupt_a_lease_holder_from_elsewhere(runner.cancel_calls)  # waits in the main thread
    (pool,) = registry.pools()
    assert pool.stats()["in_use"] == 0
    assert neopool.run(hold_lease(0)) == runner.PROCESS_LOOP_THREAD  # the next call runs


def test_calls_in_flight_can_be_waited_for_and_cancelled(process_loop: TcpProxy) -> None:
    holding = threading.Event()
    (short,) = in_threads(1, lambda: neopool.run(hold_lease(0.3)))
    (long,) = in_threads(1, lambda: neopool.run(hold_lease(30, holding)))
    assert holding.wait(10)
    assert runner.calls_in_flight() == 2
    assert not runner.wait_for_calls(1.0)  # the long one is still running
    assert short.result(1) == runner.PROCESS_LOOP_THREAD
    assert runner.cancel_calls("the test is over") == 1
    with pytest.raises(runner.CallCancelled, match="the test is over"):
        long.result(10)
    assert runner.wait_for_calls(1.0)
    assert runner.calls_in_flight() == 0


@pytest.mark.timing
def test_closing_the_process_loop_is_bounded_cancels_calls_and_closes_its_pool(
    process_loop: TcpProxy, registry: GlobalNeo4jConnectionPool
) -> None:
    holding = threading.Event()
    (call,) = in_threads(1, lambda: neopool.run(hold_lease(60, holding)))
    assert holding.wait(10)
    (pool,) = registry.pools()
    loop = runner.process_loop()
    started = time.monotonic()
    assert runner.close_process_loop(2.0)
    assert time.monotonic() - started < 2.5
    with pytest.raises(runner.CallCancelled, match="process loop was closed"):
        call.result(5)
    assert loop.is_closed()
    assert pool.closed
    assert pool.stats()["in_use"] == 0
    assert eventually(lambda: process_loop.active_connections == 0)
    assert runner.loops() == {}
    # The next call starts a new process loop.
    assert neopool.run(hold_lease(0)) == runner.PROCESS_LOOP_THREAD
    assert runner.process_loop() is not loop


@pytest.mark.timing
def test_closing_the_process_loop_ends_by_its_deadline_when_a_call_ignores_cancellation(
    process_loop: TcpProxy,
) -> None:
    ignoring = threading.Event()
    test_over = threading.Event()

    async def ignore_cancellation() -> None:
        ignoring.set()
        while not test_over.is_set():  # bounded: the test ends it, if the close did not
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)

    (call,) = in_threads(1, lambda: neopool.run(ignore_cancellation()))
    try:
        assert ignoring.wait(10)
        loop = runner.process_loop()
        started = time.monotonic()
        closed = runner.close_process_loop(timeout=1.0)
        took = time.monotonic() - started
        # Within its timeout, not just past it: the thread cuts its close short a
        # little before, so that stopping and closing the loop as it is fits too.
        assert took < 1.0, f"the close took {took:.3f} s"
        assert closed  # the thread was done by then
        assert loop.is_closed()
        with pytest.raises(runner.CallCancelled, match="process loop was closed"):
            call.result(5)
        # The next call starts a new process loop.
        assert neopool.run(hold_lease(0)) == runner.PROCESS_LOOP_THREAD
        assert runner.process_loop() is not loop
    finally:
        test_over.set()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_starts_its_own_process_loop_and_the_parent_keeps_its_own(
    process_loop: TcpProxy, registry: GlobalNeo4jConnectionPool
) -> None:
    neopool.run(hold_lease(0))
    parent_loop = runner.process_loop()
    opened = process_loop.connections_opened
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        status = 1
        try:
            report = {
                "pools_at_start": len(GlobalNeo4jConnectionPool().pools()),
                "thread": neopool.run(hold_lease(0)),
                "new_loop": runner.process_loop() is not parent_loop,
                "calls": runner.calls_in_flight(),
            }
            with os.fdopen(write_fd, "w") as pipe:
                json.dump(report, pipe)
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        report = json.load(pipe)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == {
        "pools_at_start": 0,
        "thread": runner.PROCESS_LOOP_THREAD,
        "new_loop": True,
        "calls": 0,
    }
    assert process_loop.connections_opened > opened  # the child connected for itself
    assert neopool.run(hold_lease(0)) == runner.PROCESS_LOOP_THREAD  # the parent carries on
    assert runner.process_loop() is parent_loop
    (pool,) = registry.pools()
    assert pool.stats()["drivers_created"] == 1


# -- how a call ends, whatever ends it ---------------------------------------------------


@contextlib.contextmanager
def runner_mode(process: bool) -> Iterator[None]:
    """The runner on the process loop or a loop per thread; no loop before, none after."""
    runner.close_all_loops(10)
    runner.use_process_loop(process)
    try:
        yield
    finally:
        runner.use_process_loop(False)
        runner.close_all_loops(10)
        assert runner.calls_in_flight() == 0


@pytest.fixture(params=["thread", "process"])
def loop_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test once on a loop per thread and once on the process loop (no server)."""
    with runner_mode(request.param == "process"):
        yield request.param


@pytest.fixture
def bare_process_loop() -> Iterator[None]:
    """The process loop, with no pool on it (no server)."""
    with runner_mode(True):
        yield


async def spawn_slow_to_cancel(
    cleaning: threading.Event, until: threading.Event | None = None, seconds: float = 0.3
) -> asyncio.Task[None]:
    """Spawn a task whose cleanup, once cancelled, takes a moment (closing a session,
    say): until ``until`` is set and the loop has gone round once more, or ``seconds``."""

    async def child() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cleaning.set()
            if until is not None:
                assert await eventually_async(until.is_set)
                await asyncio.sleep(0)  # what was sent with it has run
            else:
                await asyncio.sleep(seconds)
            raise

    task = asyncio.get_running_loop().create_task(child())
    await asyncio.sleep(0)  # it is under way
    return task


def test_a_call_that_failed_keeps_its_error_when_a_cancel_comes_as_its_leftovers_end(
    loop_mode: str,
) -> None:
    """A warm shutdown's deadline passing while a failed task's leftovers are being
    cancelled: the caller still gets the task's own error (so Celery records a
    failure, not a cut-off task to requeue), and nothing the call spawned is left."""
    cleaning = threading.Event()
    cancel_sent = threading.Event()
    spawned: list[asyncio.Task[None]] = []

    async def fail() -> None:
        spawned.append(await spawn_slow_to_cancel(cleaning, until=cancel_sent))
        raise ValueError("the task's own failure")

    def deadline_passes() -> None:
        assert cleaning.wait(10)
        assert runner.cancel_calls("the drain deadline passed") == 1  # the call is in flight
        cancel_sent.set()

    (cancelled,) = in_threads(1, deadline_passes)
    with pytest.raises(ValueError, match="the task's own failure"):
        neopool.run(fail())
    cancelled.result(10)
    assert spawned[0].done()
    assert runner.calls_in_flight() == 0


def test_closing_the_process_loop_keeps_the_outcome_of_a_call_that_has_ended(
    bare_process_loop: None,
) -> None:
    """Its coroutine has raised, and what it spawned is being cancelled, when the
    loop closes: the caller gets the coroutine's error, not ``CallCancelled``."""
    cleaning = threading.Event()

    async def fail() -> None:
        # Its cleanup outlasts the close's start: the close's cancel ends it.
        await spawn_slow_to_cancel(cleaning, seconds=runner.LEFTOVER_TIMEOUT / 2)
        raise ValueError("the task's own failure")

    def close_it() -> bool:
        assert cleaning.wait(10)
        return runner.close_process_loop(10)

    (closed,) = in_threads(1, close_it)
    with pytest.raises(ValueError, match="the task's own failure"):
        neopool.run(fail())
    assert closed.result(10)


def test_systemexit_reaches_its_caller_after_what_the_call_spawned_has_ended(
    loop_mode: str,
) -> None:
    cleaning = threading.Event()
    spawned: list[asyncio.Task[None]] = []

    async def exit_now() -> None:
        spawned.append(await spawn_slow_to_cancel(cleaning))
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        neopool.run(exit_now())
    assert spawned[0].done()
    assert runner.calls_in_flight() == 0


def test_systemexit_in_a_task_spawned_on_the_process_loop_tells_every_caller_why(
    bare_process_loop: None,
) -> None:
    """asyncio stops a loop whose task raises SystemExit; on the shared loop every
    call in flight is then cut off, and says so."""
    started = threading.Event()

    async def wait_long() -> None:
        started.set()
        await asyncio.sleep(3600)

    (other,) = in_threads(1, lambda: neopool.run(wait_long()))
    assert started.wait(10)

    async def spawn_an_exit() -> None:
        async def helper() -> None:
            sys.exit(3)  # a library giving up, in a background task

        asyncio.get_running_loop().create_task(helper())
        await asyncio.sleep(3600)

    with pytest.raises(runner.CallCancelled, match=r"a task raised SystemExit\(3\)"):
        neopool.run(spawn_an_exit())
    with pytest.raises(runner.CallCancelled, match=r"a task raised SystemExit\(3\)"):
        other.result(10)
    assert neopool.run(asyncio.sleep(0, result="a new loop")) == "a new loop"


def test_close_all_loops_takes_an_infinite_timeout_while_a_loop_is_busy(
    loop_mode: str,
) -> None:
    """Waited for as long as it takes: a thread's loop after its call; the process
    loop at once (its calls are cut off, as documented)."""
    started = threading.Event()
    # On the process loop the call is cut off whatever it does: make that certain.
    busy_for = 0.3 if loop_mode == "thread" else 3600

    async def briefly_busy() -> str:
        started.set()
        await asyncio.sleep(busy_for)
        return "finished"

    worker = WorkerThread("briefly-busy")
    busy = worker.submit(lambda: neopool.run(briefly_busy()))
    assert started.wait(10)
    assert runner.close_all_loops(math.inf) == 1
    if loop_mode == "thread":
        assert busy.result(10) == "finished"
    else:
        with pytest.raises(runner.CallCancelled):
            busy.result(10)
    assert runner.loops() == {}
    worker.end()
