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

* It is set the first time the main thread needs it (its runner loop is made, or
  it waits on the process loop), and set again at each call of the main thread
  (one ``set_wakeup_fd`` call, about 1 µs): code that cleared it since (asyncio
  does, as it removes its last signal handler or closes a loop that had some)
  turns it off until the next call. The main thread's runner loop reads the
  socket (a reader on it, added once per loop); in process-loop mode the main
  thread waits on the socket, which the call's end writes to too. A call made by
  a signal handler while the main thread waits there (its poll is busy) waits on
  its future instead.
* A wakeup fd someone else set is left in place (put back at once, with the
  default ``warn_on_full_buffer``, which asyncio uses: Python cannot say what it
  was): a byte meant for their loop would be lost in ours. The wakeup fd is never
  left unset in between, not even by a signal handler raising there.
* It is put back as it was (``-1``), and the socket closed, when the main thread's
  runner loop closes in the main thread, when the main thread closes the process
  loop (unless its runner loop still reads it), and so at exit. A forked child
  puts back what its parent had replaced, and closes its copies of the socket; it
  sets one of its own when it needs one.
* The wakeup is best-effort: when no socket can be made (no file descriptor
  left), or the poll fails, the main thread waits as it would without it.
* Only for loops that do not do it themselves: a selector loop; uvloop sets its
  own for each run, and so does the proactor loop on Windows, for its life.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import select
import signal
import socket
import threading
import weakref
from asyncio import selector_events
from typing import Any

__all__ = ["after_fork_in_child", "rearm", "release", "wait", "watch"]


class _Wakeup:
    """The socket pair the wakeup fd points at: the C handler writes to ``writer``."""

    __slots__ = ("fd", "loop", "pid", "poller", "reader", "writer")

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)  # set_wakeup_fd requires it
        #: What the wakeup fd is set to: ``(writer's fd,)`` (none once closed).
        self.fd: tuple[int, ...] = (self.writer.fileno(),)
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

    def wait(self) -> bool:
        """Sleep until a signal or a ring comes (one may have come already); ``False`` if
        the wait itself failed (the caller waits some other way)."""
        try:
            if self.poller is not None:
                self.poller.poll()
            else:  # pragma: no cover - Windows
                select.select([self.reader], [], [])
        except OSError as exc:
            # A signal handler's own OSError went through a frame of its own: it propagates.
            if exc.__traceback__ is None or exc.__traceback__.tb_next is not None:
                raise
            return False
        self.drain()
        return True

    def close(self) -> None:
        self.fd = ()
        self.reader.close()
        self.writer.close()


#: The process's wakeup, once made (the wakeup fd points at it, unless someone else's
#: was set or it was cleared since: :func:`rearm`).
_installed: _Wakeup | None = None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _install() -> _Wakeup | None:
    """In the main thread: the process's wakeup, the wakeup fd pointed at it; ``None`` if
    someone else's is set (it stays), or no socket can be made."""
    global _installed
    wakeup = _installed
    if wakeup is not None and wakeup.pid != os.getpid():
        after_fork_in_child()  # the parent's: the fork hook did not run
        wakeup = None
    if wakeup is None:
        try:
            wakeup = _Wakeup()
        except OSError:  # no file descriptor left, say: the waits go without
            return None
        _installed = wakeup
    return wakeup if _swap(wakeup, wakeup.fd) else None


#: ``signal.set_wakeup_fd`` as this module sets it.
_set_wakeup_fd = functools.partial(signal.set_wakeup_fd, warn_on_full_buffer=False)


def _swap(wakeup: _Wakeup, fd: tuple[int, ...]) -> bool:
    """Set the wakeup fd to ``fd`` (``wakeup``'s, or ``(-1,)``) in one call, unless someone
    else's is set: then it is put back at once, and this says ``False``.

    The one call both sets it and says what it was: no moment without a wakeup fd, in
    which a signal's byte would be lost. Made inside a list display, so that what it
    says is kept even if a signal handler raises as the call returns (between two
    bytecodes): someone else's is put back then too, before the exception propagates.
    """
    old: list[int] = []
    try:
        old = [*map(_set_wakeup_fd, fd)]
    finally:
        theirs = old[0] if old and old[0] != -1 and (old[0],) != wakeup.fd else -1
        if theirs != -1:
            try:
                signal.set_wakeup_fd(theirs)
            except (ValueError, OSError):  # closed, or not usable: nobody's any more
                theirs = -1
    return theirs == -1


def rearm() -> None:
    """At each call of the main thread's runner loop: point the wakeup fd at the socket
    again, unless someone else's is set (code may have cleared it since)."""
    wakeup = _installed
    if wakeup is not None:
        _swap(wakeup, wakeup.fd)


def watch(loop: asyncio.AbstractEventLoop) -> bool:
    """``loop`` is the calling thread's new runner loop: if that is the main thread, a
    signal wakes it (the loop reads the socket for its life; :func:`rearm` at each of its
    calls). Whether it does."""
    if not _in_main_thread() or not isinstance(loop, selector_events.BaseSelectorEventLoop):
        return False
    _install()  # someone else's wakeup fd may be set: a later call sets ours
    wakeup = _installed
    if wakeup is None:
        return False
    wakeup.drain()  # what came while nothing read it: not news for this loop
    loop.add_reader(wakeup.reader.fileno(), wakeup.drain)
    wakeup.loop = weakref.ref(loop)
    return True


#: The main thread waits in :func:`wait` (a signal handler's call made there does not).
_waiting = False


def wait(future: concurrent.futures.Future[Any]) -> None:
    """Until ``future`` is done; in the main thread, a signal wakes the wait too (its
    handler's exception is raised here). Elsewhere, or in a signal handler's call while
    the main thread waits here, or if the wakeup cannot be had, returns at once: the
    caller waits on the future."""
    global _waiting
    if _waiting or not _in_main_thread():
        return  # nested: the outer wait's poll is busy, and its ring is not ours to read
    wakeup = _install()
    if wakeup is None:
        return
    _waiting = True
    try:
        future.add_done_callback(wakeup.ring)
        while not future.done() and wakeup.wait():
            pass
    finally:
        _waiting = False


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
    _swap(wakeup, (-1,))  # someone else's since: it stays


def after_fork_in_child() -> None:
    """The parent's wakeup is not the child's: the wakeup fd is put back as it was before
    it, and the child's copies of its socket are closed (the parent's loop, kept here and
    never run, still names it; the parent's own copies stay open)."""
    global _installed, _waiting
    wakeup, _installed = _installed, None
    _waiting = False  # the parent's main thread may have been waiting: the child's is not
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
