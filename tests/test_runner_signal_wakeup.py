"""A signal wakes the main thread's wait in neopool.run at once, whichever thread the kernel
delivers it to (no server needed).

Python runs signal handlers in the main thread; the kernel may deliver a process's
signal to any thread that does not block it, and there its C-level handler only
notes it. These tests block the signal in the main thread, so the kernel must deliver
it elsewhere, as it may for Celery's soft time limit under prefork.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import neopool
from neopool import runner

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not hasattr(signal, "pthread_sigmask"), reason="needs signal.pthread_sigmask (POSIX)"
    ),
]

#: How long a wait that the signal did not wake lasts before the test wakes it itself
#: (as the call's next I/O would): far above the bound the tests check.
UNWOKEN = 10.0
#: Within how long of the signal the call must have raised.
PROMPTLY = 2.0


class Interrupted(Exception):
    """Raised from a signal handler, as Celery raises SoftTimeLimitExceeded."""


@pytest.fixture(autouse=True)
def main_thread() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    runner.use_process_loop(False)
    runner.close_all_loops(5)  # the main thread's loop is made by the test
    yield
    runner.use_process_loop(False)
    runner.close_all_loops(5)


def wakeup_fd() -> int:
    """The wakeup fd set now (put back as it was)."""
    current = signal.set_wakeup_fd(-1)
    if current != -1:
        signal.set_wakeup_fd(current)
    return current


async def wait_for_ever() -> None:
    """A query the server never answers."""
    await asyncio.get_running_loop().create_future()


def seconds_to_interrupt(wake: Callable[[], object]) -> float:
    """Run a call that waits for ever in the main thread; SIGUSR1 (blocked in the main
    thread) is sent to the process from another thread once it waits, and raises
    :class:`Interrupted`: seconds from the signal to the call raising it.

    ``wake()`` wakes the wait ``UNWOKEN`` s after the signal if nothing has raised (the
    call's next I/O would), so a wait the signal does not wake fails the bound.
    """
    waiting = threading.Event()
    done = threading.Event()
    sent: list[float] = []

    async def call() -> None:
        waiting.set()
        await wait_for_ever()

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    def send_once_waiting() -> None:
        if waiting.wait(30):
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGUSR1)
            if not done.wait(UNWOKEN):
                wake()

    previous = signal.signal(signal.SIGUSR1, interrupt)
    # Started before the main thread blocks the signal, so it does not.
    sender = threading.Thread(target=send_once_waiting, name="signal-sender")
    sender.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        with pytest.raises(Interrupted):
            neopool.run(call())
        raised = time.monotonic()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        done.set()
        waiting.set()
        sender.join(30)
        signal.signal(signal.SIGUSR1, previous)
    return raised - sent[0]


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


def test_a_wakeup_fd_someone_else_set_is_left_in_place() -> None:
    theirs, peer = socket.socketpair()
    theirs.setblocking(False)
    try:
        signal.set_wakeup_fd(theirs.fileno())
        neopool.run(asyncio.sleep(0))
        assert wakeup_fd() == theirs.fileno()
        runner.close_thread_loop()
        assert wakeup_fd() == theirs.fileno()
    finally:
        signal.set_wakeup_fd(-1)
        theirs.close()
        peer.close()


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
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            report = [wakeup_fd() == -1]  # the parent's is not the child's
            report.append(seconds_to_interrupt(wake_thread_loop()) < PROMPTLY)
            report.append(wakeup_fd() not in (-1, parents))
            os.write(write, bytes(int(ok) for ok in report))
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    answer = os.read(read, 16)
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    assert list(answer) == [1, 1, 1]
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
