"""A signal wakes the main thread's wait in :func:`neopool.run` (``signal.set_wakeup_fd``).

Python runs a signal's handler (Celery's soft time limit, ``KeyboardInterrupt``)
in the main thread, between two bytecodes. The kernel runs the C-level handler,
which only notes the signal, in whichever thread it picks: another thread of
the process, or the main thread itself just before it goes to sleep in its
loop's selector (or on a future, in process-loop mode). Either way the main
thread sleeps on, and the handler waits for whatever wakes it next: the call's
next I/O or timer, tens of seconds later for a slow query. The C handler also
writes a byte to the *wakeup fd*, when one is set: this module points it at a
socket that the main thread's waits read, as asyncio does for its own signal
handlers (``add_signal_handler``).

* It is set once, the first time the main thread needs it (its runner loop is
  made, or it waits on the process loop), not per call; the main thread's runner
  loop reads the socket (a reader on it, added once per loop); in process-loop
  mode the main thread waits on the socket, which the call's end writes to too.
* A wakeup fd someone else set is left in place: a byte meant for their loop
  would be lost in ours. Code that clears the wakeup fd afterwards (asyncio does,
  as it removes its last signal handler) turns it off until it is set again
  (the next runner loop of the main thread).
* It is put back as it was (``-1``), and the socket closed, when the main thread's
  runner loop closes in the main thread, when the main thread closes the process
  loop (unless its runner loop still reads it), and so at exit. A forked child
  puts back what its parent had replaced, and closes its copies of the socket; it
  sets one of its own when it needs one.
* Only for loops that do not do it themselves: a selector loop; uvloop sets its
  own for each run, and so does the proactor loop on Windows, for its life.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import select
import signal
import socket
import threading
import weakref
from asyncio import selector_events
from typing import Any

__all__ = ["after_fork_in_child", "release", "wait", "watch"]


class _Wakeup:
    """The socket pair the wakeup fd points at: the C handler writes to ``writer``."""

    __slots__ = ("loop", "pid", "poller", "reader", "writer")

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)  # set_wakeup_fd requires it
        self.pid = os.getpid()
        #: The main thread's runner loop that reads it, if any.
        self.loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self.poller = select.poll() if hasattr(select, "poll") else None
        if self.poller is not None:
            self.poller.register(self.reader, select.POLLIN)

    def ring(self, _: object = None) -> None:
        """Wake the main thread's wait (from any thread)."""
        with contextlib.suppress(OSError):  # full (it wakes anyway), or closed
            self.writer.send(b"\0")

    def drain(self) -> None:
        """Read what the signals (and rings) wrote."""
        with contextlib.suppress(OSError):  # BlockingIOError: nothing more
            while self.reader.recv(4096):
                pass

    def wait(self) -> None:
        """Sleep until a signal or a ring comes (one may have come already)."""
        if self.poller is not None:
            self.poller.poll()
        else:  # pragma: no cover - Windows
            select.select([self.reader], [], [])
        self.drain()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


#: The process's wakeup, while the wakeup fd is ours (as far as we know).
_installed: _Wakeup | None = None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _install() -> _Wakeup | None:
    """In the main thread: point the wakeup fd at our socket, unless someone else's is set."""
    global _installed
    wakeup = _installed
    if wakeup is not None:
        if wakeup.pid == os.getpid():
            return wakeup
        after_fork_in_child()  # the parent's: the fork hook did not run
    try:
        current = signal.set_wakeup_fd(-1)  # costs no system call: only reads it
    except ValueError:  # not the main thread
        return None
    if current != -1:
        try:
            signal.set_wakeup_fd(current)  # someone else's: it stays
            return None
        except (ValueError, OSError):  # closed, or not usable: nobody's any more
            pass
    wakeup = _Wakeup()
    try:
        signal.set_wakeup_fd(wakeup.writer.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):  # pragma: no cover - the socket is non-blocking, and ours
        wakeup.close()
        return None
    _installed = wakeup
    return wakeup


def watch(loop: asyncio.AbstractEventLoop) -> None:
    """``loop`` is the calling thread's new runner loop: if that is the main thread, a
    signal wakes it (once set, for the loop's life)."""
    if not _in_main_thread() or not isinstance(loop, selector_events.BaseSelectorEventLoop):
        return
    wakeup = _install()
    if wakeup is not None:
        wakeup.drain()  # what came while nothing read it: not news for this loop
        loop.add_reader(wakeup.reader.fileno(), wakeup.drain)
        wakeup.loop = weakref.ref(loop)


def wait(future: concurrent.futures.Future[Any]) -> None:
    """Until ``future`` is done; in the main thread, a signal wakes the wait too (its
    handler's exception is raised here). Elsewhere, returns at once: the caller waits."""
    wakeup = _install() if _in_main_thread() else None
    if wakeup is None:
        return
    future.add_done_callback(wakeup.ring)
    while not future.done():
        wakeup.wait()


def release(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """In the main thread, as its runner loop ``loop`` closes, or the runner's loops do
    (``loop`` None): put the wakeup fd back as it was, and close the socket, unless an
    open runner loop of the main thread still reads it. Elsewhere nothing: the socket
    stays, the next runner loop of the main thread reads it."""
    global _installed
    wakeup = _installed
    if wakeup is None or wakeup.pid != os.getpid() or not _in_main_thread():
        return
    reading = wakeup.loop() if wakeup.loop is not None else None
    if reading is not None and reading is not loop and not reading.is_closed():
        return
    _installed = None
    if loop is not None and not loop.is_closed():
        with contextlib.suppress(Exception):
            loop.remove_reader(wakeup.reader.fileno())
    _put_back(wakeup)
    wakeup.close()


def _put_back(wakeup: _Wakeup) -> None:
    current = signal.set_wakeup_fd(-1)
    if current not in (-1, wakeup.writer.fileno()):  # someone else's since: it stays
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(current)


def after_fork_in_child() -> None:
    """The parent's wakeup is not the child's: the wakeup fd is put back as it was before
    it, and the child's copies of its socket are closed (the parent's loop, kept here and
    never run, still names it; the parent's own copies stay open)."""
    global _installed
    wakeup, _installed = _installed, None
    if wakeup is None:
        return
    try:
        _put_back(wakeup)
    except ValueError:  # pragma: no cover - the forking thread is the child's main thread
        _kept.append(wakeup)  # the wakeup fd still names it: never closed, never reused
        return
    wakeup.close()


#: A parent's wakeup that a child could not undo: kept open for good.
_kept: list[_Wakeup] = []
