"""A call's guarantees on the fast path: Ctrl-C in the main thread, many spawned tasks."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

import neopool
from neopool import runner

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def thread_mode() -> object:
    runner.use_process_loop(False)
    yield
    runner.close_all_loops(5)


def test_ctrl_c_during_a_call_cancels_its_coroutine_and_lets_it_finish_first(
    thread_mode: object,
) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("Ctrl-C must raise KeyboardInterrupt here")
    waiting = threading.Event()
    cleaned_up: list[bool] = []
    spawned: list[asyncio.Task[None]] = []

    async def call() -> None:
        spawned.append(asyncio.ensure_future(asyncio.sleep(30)))
        try:
            waiting.set()
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0)  # a cleanup that awaits, as returning a lease does
            cleaned_up.append(True)

    def press_ctrl_c() -> None:
        waiting.wait(10)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        neopool.run(call())
    assert cleaned_up == [True]
    assert spawned[0].cancelled()
    # Python's own handler is still there: the call never swapped it.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert neopool.run(asyncio.sleep(0, "next")) == "next"  # the loop goes on


def test_a_task_left_running_after_thousands_of_finished_ones_is_cancelled_at_the_end(
    thread_mode: object,
) -> None:
    left: list[asyncio.Task[None]] = []

    async def call() -> int:
        for _ in range(5000):  # the list of spawned tasks is pruned as it grows
            await asyncio.ensure_future(asyncio.sleep(0))
        left.append(asyncio.ensure_future(asyncio.sleep(30)))
        for _ in range(200):
            await asyncio.ensure_future(asyncio.sleep(0))
        return 1

    assert neopool.run(call()) == 1
    assert left[0].cancelled()
