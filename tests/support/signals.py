"""A signal from another thread, as a process-directed signal (Celery's soft time limit)
may be delivered: the main thread blocks it, so the kernel hands it to another thread."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from polling import eventually

#: How long a wait that the signal did not wake lasts before the test wakes it itself
#: (as the call's next I/O would): far above the bound the tests check.
UNWOKEN = 10.0
#: Within how long of the signal the call must have raised.
PROMPTLY = 2.0


class Interrupted(Exception):
    """Raised from a signal handler, as Celery raises SoftTimeLimitExceeded."""


@contextlib.contextmanager
def signalled_elsewhere(
    ready: threading.Event,
    wake: Callable[[], object],
    asleep: Callable[[], bool] = lambda: True,
) -> Iterator[list[float]]:
    """SIGUSR1 raises :class:`Interrupted`; it is sent to the process from another
    thread once ``ready`` is set and ``asleep()`` says the main thread sleeps, while
    the main thread blocks it.

    The kernel then delivers it to another thread of the process, whose C-level
    handler only notes it: the Python handler runs in the main thread once something
    wakes it. Yields ``[when it was sent]``. If the main thread has not raised
    ``UNWOKEN`` s later, ``wake()`` wakes it, so a wait that the signal does not wake
    fails the test's bound instead of hanging.
    """
    sent: list[float] = []
    done = threading.Event()

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    def send_once_ready() -> None:
        if ready.wait(30) and eventually(asleep):
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGUSR1)
            if not done.wait(UNWOKEN):
                wake()

    previous = signal.signal(signal.SIGUSR1, interrupt)
    # Started before the main thread blocks the signal, so it does not: one of the
    # threads the kernel can pick.
    sender = threading.Thread(target=send_once_ready, name="signal-sender")
    sender.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        yield sent
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        done.set()
        ready.set()  # the sender stops waiting, whatever happened
        sender.join(30)
        signal.signal(signal.SIGUSR1, previous)
