"""Work done as a thread ends, off that thread.

A finaliser kept in a thread-local runs as the thread's locals go, when
``threading`` has already let the thread go. Anything there that asks who the
current thread is (a log record, a ``threading.Thread`` started without
``daemon=``, as asyncio's executor shutdown does) registers it again as a dummy
thread, which Python 3.13.0-3.13.2 fail to delete at exit ("Exception ignored in
_DeleteDummyThreadOnDel.__del__"). So that work runs on a thread of its own,
started without asking (``daemon`` given) and waited for by an event, not a join.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_off_ending_thread(work: Callable[[], None], ending: int | None, timeout: float) -> None:
    """Run ``work`` for the thread ``ending`` (its ident), and wait up to ``timeout`` s.

    On that thread itself (its locals going), ``work`` runs on a new thread; anywhere
    else (a forked child dropping its parent's threads, a replaced thread-local) it
    runs here. ``work`` must not raise. At interpreter shutdown, when no thread can
    start, it runs here too.
    """
    if threading.get_ident() != ending:  # asks nobody's name: safe on an ending thread
        work()
        return
    done = threading.Event()

    def run() -> None:
        try:
            work()
        finally:
            done.set()

    try:
        threading.Thread(target=run, name="neopool-thread-end", daemon=True).start()
    except RuntimeError:  # the interpreter is shutting down: no new thread
        run()
    done.wait(timeout)
