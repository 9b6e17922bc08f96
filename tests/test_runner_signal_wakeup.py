"""A signal wakes the main thread's wait in neopool.run at once, whichever thread the kernel
delivers it to (no server needed).

Python runs signal handlers in the main thread; the kernel may deliver a process's
signal to any thread that does not block it, and there its C-level handler only
notes it. These tests block the signal in the main thread, so the kernel must deliver
it elsewhere, as it may for Celery's soft time limit under prefork.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import neopool
from forking import checks_in_a_forked_child
from neopool import runner
from polling import eventually
from signals import PROMPTLY, UNWOKEN, Interrupted, signalled_elsewhere

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not hasattr(signal, "pthread_sigmask"), reason="needs signal.pthread_sigmask (POSIX)"
    ),
]


@pytest.fixture(autouse=True)
def main_thread() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    runner.use_process_loop(False)
    runner.close_all_loops(5)  # the main thread's loop is made by the test
    yield
    runner.use_process_loop(False)
    runner.close_all_loops(5)


@pytest.fixture
def their_wakeup_fd() -> Iterator[int]:
    """A wakeup fd someone else (another library, another loop) set: neopool's to leave."""
    theirs, peer = socket.socketpair()
    theirs.setblocking(False)
    signal.set_wakeup_fd(theirs.fileno())
    try:
        yield theirs.fileno()
    finally:
        signal.set_wakeup_fd(-1)
        theirs.close()
        peer.close()


def wakeup_fd() -> int:
    """The wakeup fd set now (put back as it was)."""
    current = signal.set_wakeup_fd(-1)
    if current != -1:
        signal.set_wakeup_fd(current)
    return current


async def wait_for_ever() -> None:
    """A query the server never answers."""
    await asyncio.get_running_loop().create_future()


def seconds_to_interrupt(
    wake: Callable[[], object], asleep: Callable[[], bool] = lambda: True
) -> float:
    """Run a call that waits for ever in the main thread; SIGUSR1 (blocked in the main
    thread) is sent to the process from another thread once it waits and ``asleep()``
    (before, the main thread would run the handler at its next bytecode, woken or
    not), and raises :class:`Interrupted`: seconds from the signal to the call raising
    it. ``wake()`` wakes the wait if the signal does not (see ``signalled_elsewhere``).
    """
    waiting = threading.Event()

    async def call() -> None:
        waiting.set()
        await wait_for_ever()

    with signalled_elsewhere(waiting, wake, asleep) as sent:
        with pytest.raises(Interrupted):
            neopool.run(call())
        raised = time.monotonic()
    return raised - sent[0]


def main_thread_waits_in(function: str, module: str) -> bool:
    """Whether the main thread's innermost Python frame is ``function`` of ``module``
    (blocked in the C call it makes there: the test holds the GIL as it looks)."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    return (
        frame is not None
        and frame.f_code.co_name == function
        and frame.f_code.co_filename.endswith(module)
    )


def main_thread_polls() -> bool:
    """Whether the main thread sleeps in the wakeup's poll (in process-loop mode)."""
    return main_thread_waits_in("wait", "_signal_wakeup.py")


def main_thread_selects() -> bool:
    """Whether the main thread sleeps in its runner loop's selector."""
    return main_thread_waits_in("select", "selectors.py")


def wake_thread_loop() -> Callable[[], object]:
    loop = runner.thread_loop()
    return lambda: loop.call_soon_threadsafe(lambda: None)


@pytest.mark.timing
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_signal_delivered_to_another_thread_interrupts_the_main_threads_call_at_once(
    mode: str,
) -> None:
    if mode == "process":
        runner.use_process_loop()
        wake: Callable[[], object] = runner.cancel_calls
    else:
        wake = wake_thread_loop()
    assert seconds_to_interrupt(wake) < PROMPTLY
    assert seconds_to_interrupt(wake) < PROMPTLY  # and the next call's too
    assert neopool.run(asyncio.sleep(0, "next")) == "next"


def test_the_wakeup_fd_is_set_while_the_main_threads_loop_lives_and_put_back_as_it_closes() -> None:
    assert wakeup_fd() == -1
    neopool.run(asyncio.sleep(0))
    assert wakeup_fd() != -1  # set once, for the loop's life: not per call
    runner.close_thread_loop()
    assert wakeup_fd() == -1
    neopool.run(asyncio.sleep(0))  # the next loop sets it again
    assert wakeup_fd() != -1


def test_a_wakeup_fd_someone_else_set_is_left_in_place(their_wakeup_fd: int) -> None:
    neopool.run(asyncio.sleep(0))
    assert wakeup_fd() == their_wakeup_fd
    runner.close_thread_loop()
    assert wakeup_fd() == their_wakeup_fd


def test_asyncio_signal_handlers_on_the_main_threads_loop_still_work() -> None:
    async def call() -> int:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[int] = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR2, got.set_result, 2)
        try:
            threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGUSR2)).start()
            return await asyncio.wait_for(got, UNWOKEN)
        finally:
            loop.remove_signal_handler(signal.SIGUSR2)

    assert neopool.run(call()) == 2


@pytest.mark.timing
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_is_woken_by_its_own_signals_and_the_parent_still_by_its_own() -> None:
    neopool.run(asyncio.sleep(0))  # the parent's wakeup is set
    parents = wakeup_fd()

    def in_the_child() -> list[bool]:
        report = [wakeup_fd() == -1]  # the parent's is not the child's
        report.append(seconds_to_interrupt(wake_thread_loop()) < PROMPTLY)
        report.append(wakeup_fd() not in (-1, parents))
        return report

    assert checks_in_a_forked_child(in_the_child) == [True, True, True]
    assert wakeup_fd() == parents
    assert seconds_to_interrupt(wake_thread_loop()) < PROMPTLY


def test_leftover_signal_bytes_do_not_keep_the_loop_busy() -> None:
    """Signals that came between calls wrote to the socket: read at the next call, once."""
    previous = signal.signal(signal.SIGUSR2, lambda *_: None)
    try:
        neopool.run(asyncio.sleep(0))
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGUSR2)  # between calls: nothing reads them now

        async def idle_iterations() -> int:
            loop = asyncio.get_running_loop()
            spins = 0
            original = loop._selector.select  # type: ignore[attr-defined]

            def counting(timeout: float | None = None) -> Any:
                nonlocal spins
                spins += 1
                return original(timeout)

            loop._selector.select = counting  # type: ignore[attr-defined]
            try:
                await asyncio.sleep(0.2)
            finally:
                loop._selector.select = original  # type: ignore[attr-defined]
            return spins

        assert neopool.run(idle_iterations()) < 10  # not a busy loop on a readable socket
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.mark.timing
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_the_wakeup_fd_is_set_again_after_asyncio_code_cleared_it(mode: str) -> None:
    """asyncio clears the wakeup fd as a loop that had signal handlers closes."""
    if mode == "process":
        runner.use_process_loop()
        wake: Callable[[], object] = runner.cancel_calls
        asleep = main_thread_polls
    else:
        wake = wake_thread_loop()
        asleep = main_thread_selects
    neopool.run(asyncio.sleep(0))
    other = asyncio.new_event_loop()
    other.add_signal_handler(signal.SIGUSR2, lambda: None)
    other.close()
    assert wakeup_fd() == -1
    assert seconds_to_interrupt(wake, asleep) < PROMPTLY


def test_a_wakeup_fd_someone_else_set_after_the_loop_was_made_is_left_in_place() -> None:
    neopool.run(asyncio.sleep(0))
    theirs, peer = socket.socketpair()
    with theirs, peer:
        theirs.setblocking(False)
        signal.set_wakeup_fd(theirs.fileno())
        try:
            neopool.run(asyncio.sleep(0))
            assert wakeup_fd() == theirs.fileno()
        finally:
            signal.set_wakeup_fd(-1)


def test_a_signal_handler_raising_as_the_wakeup_fd_is_looked_at_leaves_someone_elses(
    their_wakeup_fd: int,
) -> None:
    """A signal handler runs between two bytecodes: here, right after the first
    ``set_wakeup_fd`` call returns (as a profile function sees it)."""

    def raise_after_set_wakeup_fd(frame: Any, event: str, arg: Any) -> None:
        if event == "c_return" and arg is signal.set_wakeup_fd:
            sys.setprofile(None)
            raise KeyboardInterrupt

    call = asyncio.sleep(0)
    sys.setprofile(raise_after_set_wakeup_fd)
    try:
        with pytest.raises(KeyboardInterrupt):
            neopool.run(call)  # the main thread's loop is made
    finally:
        sys.setprofile(None)
        call.close()
    assert wakeup_fd() == their_wakeup_fd


def test_a_call_from_a_signal_handler_while_the_main_thread_waits_on_the_process_loop() -> None:
    """The handler runs inside the main thread's poll (interrupted by the signal)."""
    runner.use_process_loop()
    waiting = threading.Event()
    handled: concurrent.futures.Future[str] = concurrent.futures.Future()

    async def outer() -> str:
        waiting.set()
        return await asyncio.wrap_future(handled)

    def handler(signum: int, frame: Any) -> None:
        try:
            handled.set_result(neopool.run(asyncio.sleep(0, "inner")))
        except BaseException as exc:
            handled.set_exception(exc)
            raise

    def send_once_polling() -> None:
        if waiting.wait(30) and eventually(main_thread_polls):
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, handler)
    sender = threading.Thread(target=send_once_polling, name="signal-sender")
    sender.start()
    try:
        assert neopool.run(outer()) == "inner"
    finally:
        sender.join(30)
        signal.signal(signal.SIGUSR1, previous)
    assert neopool.run(asyncio.sleep(0, "next")) == "next"


def test_no_file_descriptor_for_the_wakeup_is_not_an_interrupt() -> None:
    """The process loop is running; the main thread's first wait on it finds no fd left."""
    import resource  # POSIX

    runner.use_process_loop()
    runner.process_loop()
    assert wakeup_fd() == -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        with pytest.raises(OSError, match="Too many open files"):
            socket.socketpair()
        assert neopool.run(asyncio.sleep(0, "done")) == "done"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
