"""Notice when a shared event loop is blocked, and name the call that blocked it.

On the process loop every task of the process shares one thread: a synchronous
call inside a coroutine (a database lookup in a model wrapper, ``time.sleep``,
``requests.get``) stalls all of them, and nothing else says so. asyncio's debug
mode would, at a cost no production worker pays.

This costs a timer and a sleeping thread. A heartbeat callback on the loop
notes the time every ``threshold / 2`` seconds; a daemon watchdog thread wakes
as often and checks it. When the heartbeat is late by more than ``threshold``
while the loop is running, the watchdog samples the loop thread's stack once
(:func:`sys._current_frames`) and keeps the innermost frame outside the
standard library, asyncio, uvloop and neopool (the blocking call) and the
innermost coroutine there (the task's function). When the heartbeat comes
again, it logs one warning with how long the loop was blocked: once per call
site per episode, at most one line a minute per site, counting the rest
(:class:`~neopool.stats.SayOnce`). Not reported: a stack that shows only
those packages (the loop waiting in ``select``), and, where Linux's ``/proc``
tells, a loop thread that was runnable but got little CPU meanwhile (an
overloaded machine, not a blocking call).

The watchdog refers to its loop weakly and ends when the loop is closed or
collected, or when :meth:`LoopWatch.stop` is called; a forked child has no
watchdog thread until its own loop starts one.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import sysconfig
import threading
import time
import weakref
from dataclasses import dataclass
from types import FrameType
from typing import Any

from pydantic import ValidationError, create_model

from neopool.errors import ConfigError
from neopool.stats import PROCESS, SayOnce

logger = logging.getLogger("neopool")

#: The setting, and its variable, that sets the threshold.
SETTING = "blocked_loop_threshold"
ENV = "NEOPOOL_BLOCKED_LOOP_THRESHOLD"
#: A block still going on after this many seconds (and ten thresholds) is reported before it ends.
LONG_BLOCK_S = 5.0

_COROUTINE_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE


def _folder(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), "")


#: Packages whose frames are never the program's own: asyncio, neopool, uvloop.
_MACHINERY = tuple(
    _folder(module.__file__)
    for module in (asyncio, sys.modules[__package__ or "neopool"], sys.modules.get("uvloop"))
    if module is not None and module.__file__ is not None
)
#: The standard library (installed packages under it excepted).
_STDLIB = tuple(
    {
        os.path.join(path, "")
        for key in ("stdlib", "platstdlib")
        if (path := sysconfig.get_path(key))
    }
)


def _is_internal(filename: str) -> bool:
    if filename.startswith("<") or filename.startswith(_MACHINERY):
        return True  # <frozen ...>, <string>; the loop's own machinery
    if os.sep + "uvloop" + os.sep in filename:
        return True
    return filename.startswith(_STDLIB) and not (
        "site-packages" in filename or "dist-packages" in filename
    )


@dataclass(frozen=True)
class Site:
    """Where the loop was found blocked: the call, and the coroutine that made it."""

    function: str
    filename: str
    lineno: int
    coroutine: str | None = None
    coroutine_filename: str | None = None
    coroutine_lineno: int | None = None

    @property
    def key(self) -> str:
        """``file:line`` of the blocking frame: one call site."""
        return f"{self.filename}:{self.lineno}"

    def describe(self) -> str:
        text = f"{self.function}() at {self.key}"
        if self.coroutine is not None and (
            self.coroutine != self.function or self.coroutine_filename != self.filename
        ):
            text += (
                f", called from coroutine {self.coroutine}() at "
                f"{self.coroutine_filename}:{self.coroutine_lineno}"
            )
        elif self.coroutine is not None:
            text = f"coroutine {text}"
        return text


def blocking_site(frame: FrameType | None) -> Site | None:
    """The innermost frame of the program's own code in a stack, and its coroutine.

    ``None`` when every frame belongs to the standard library, asyncio, uvloop
    or neopool: the loop is waiting for I/O or running its own machinery.
    """
    found: Site | None = None
    while frame is not None:
        code = frame.f_code
        if not _is_internal(code.co_filename):
            if found is None:
                found = Site(code.co_name, code.co_filename, frame.f_lineno)
            if code.co_flags & _COROUTINE_FLAGS:
                return Site(
                    found.function,
                    found.filename,
                    found.lineno,
                    code.co_name,
                    code.co_filename,
                    frame.f_lineno,
                )
        frame = frame.f_back
    return found


#: A thread that got less than this share of a CPU while runnable was starved, not blocking.
STARVED_SHARE = 0.25
#: Seconds of a block needed to judge starvation (CPU time is counted in clock ticks).
JUDGE_AFTER_S = 0.1
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_cpu(native_id: int | None) -> tuple[str, float] | None:
    """A thread's scheduler state (``R`` runnable, ``S`` sleeping...) and CPU seconds (Linux).

    ``None`` where ``/proc`` does not tell.
    """
    if native_id is None:
        return None
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as stat:
            data = stat.read()
        fields = data[data.rindex(b")") + 2 :].split()
        return fields[0].decode(), (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class _Block:
    beat_at: float  #: the last heartbeat before the block
    site: Site
    seen_at: float  #: when the watchdog saw it
    cpu: tuple[str, float] | None  #: the loop thread's state and CPU time then
    reported: bool = False


class LoopWatch:
    """The heartbeat on one loop and the watchdog thread beside it (see the module)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, threshold: float
    ) -> None:
        self.threshold = threshold
        self.interval = threshold / 2
        self._loop = weakref.ref(loop)
        assert thread.ident is not None, "watch() takes a thread that has started"
        self._thread_id: int = thread.ident
        self._native_id = thread.native_id
        self._beat_at = time.monotonic()
        self._stopped = threading.Event()
        self._limiters: dict[str, SayOnce] = {}
        loop.call_soon_threadsafe(self._beat)
        self._watchdog = threading.Thread(
            target=self._watch, name="neopool-blocked-loop-watch", daemon=True
        )
        self._watchdog.start()

    @property
    def watching(self) -> bool:
        """Whether the watchdog thread is still running."""
        return self._watchdog.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Stop watching (the loop's own end stops it too); wait up to ``timeout`` for it.

        The heartbeat stops at its next beat. (No handle of it is kept: a timer
        handle refers to its loop, and the watch must not keep the loop alive.)
        """
        self._stopped.set()
        if timeout is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout)

    # -- on the loop ---------------------------------------------------------------
    def _beat(self) -> None:
        self._beat_at = time.monotonic()
        if self._stopped.is_set():
            return
        loop = self._loop()
        if loop is not None:
            loop.call_later(self.interval, self._beat)

    # -- on the watchdog thread ----------------------------------------------------
    def _watch(self) -> None:
        block: _Block | None = None
        while not self._stopped.wait(self.interval):
            loop = self._loop()
            if loop is None or loop.is_closed():
                return
            running = loop.is_running()
            del loop  # never held between looks
            beat_at = self._beat_at
            if block is not None and beat_at != block.beat_at:  # the loop ran again
                if not block.reported and not self._starved(block):
                    gap = beat_at - block.beat_at  # blocked between gap - interval and gap
                    self._report(block.site, gap - self.interval / 2, ended=True)
                block = None
            late = time.monotonic() - beat_at - self.interval
            if block is None:
                if late > self.threshold and running:
                    site = self._sample()
                    if site is not None:
                        cpu = thread_cpu(self._native_id)
                        block = _Block(beat_at, site, time.monotonic(), cpu)
            elif not block.reported and late >= max(LONG_BLOCK_S, 10 * self.threshold):
                if not self._starved(block):
                    self._report(block.site, late, ended=False)
                block.reported = True

    def _starved(self, block: _Block) -> bool:
        """Whether the loop's thread was runnable but hardly ran: the machine, not the code.

        On an overloaded machine (or under a CPU quota) a thread may wait for a
        CPU for longer than the threshold, wherever it happens to be; that is
        no blocking call of the program's. A thread blocked in a call sleeps
        (``S``), one computing gets its CPU time.
        """
        elapsed = time.monotonic() - block.seen_at
        now = thread_cpu(self._native_id)
        if block.cpu is None or now is None or elapsed < JUDGE_AFTER_S:
            return False
        state, cpu = block.cpu
        return state == "R" and now[1] - cpu < STARVED_SHARE * elapsed

    def _sample(self) -> Site | None:
        frame = sys._current_frames().get(self._thread_id)
        try:
            return blocking_site(frame)
        finally:
            del frame

    def _report(self, site: Site, seconds: float, *, ended: bool) -> None:
        PROCESS.loop_blocked()
        limiter = self._limiters.get(site.key)
        if limiter is None:
            limiter = self._limiters[site.key] = SayOnce()
        say = limiter.occurred()
        limiter.cleared()  # a block is an event: nothing goes on after it
        if say is None:
            return
        logger.warning(
            "neopool: the process loop was blocked %s %.2f s by %s: every task of this "
            "process waited. Make the call async or run it with 'await asyncio.to_thread(...)'. "
            "(Warned past %s = %g s, %s; 0 turns this off.)%s",
            "for about" if ended else "for at least",
            seconds,
            site.describe(),
            SETTING,
            self.threshold,
            ENV,
            say.note("blocks at this place"),
        )


def configured_threshold() -> float | None:
    """``blocked_loop_threshold`` of the configuration in use (or of the environment).

    With no configuration, :data:`ENV` still counts; a value the configuration
    would refuse is logged as a warning (the variable, the value, what is wrong,
    the fix) and the default is used, since the loop it is read for has already
    started. A configuration built from that environment raises
    :class:`~neopool.errors.ConfigError` for the same value.
    """
    from neopool.config import Neo4jConnectionConfig
    from neopool.registry import GlobalNeo4jConnectionPool

    try:
        return GlobalNeo4jConnectionPool.get_config().blocked_loop_threshold
    except ConfigError:  # no server configured yet: the setting alone still counts
        field = Neo4jConnectionConfig.model_fields[SETTING]
        default: float | None = field.default
        text = os.environ.get(ENV)
        if text is None:
            return default
        # The setting's own field, so that a value is refused here as by Neo4jConnectionConfig.
        definition: Any = (field.annotation, field)
        setting = create_model("BlockedLoopThreshold", **{SETTING: definition})
        try:
            value: float | None = getattr(setting.model_validate({ENV: text}), SETTING)
        except ValidationError as exc:
            problem = exc.errors(include_input=False, include_url=False)[0]["msg"]
            logger.warning(
                "neopool: %s=%r is not a valid %s (%s); the process loop is watched with "
                "the default, %s s. Set %s to a number of seconds >= 0 (0 turns the "
                "blocked-loop warning off) or unset it; Neo4jConnectionConfig refuses this "
                "value with a ConfigError.",
                ENV,
                text,
                SETTING,
                problem,
                default,
                ENV,
            )
            return default
        return value


def watch(
    loop: asyncio.AbstractEventLoop, thread: threading.Thread, threshold: float | None = None
) -> LoopWatch | None:
    """Watch ``loop``, run by ``thread`` (started); ``None`` if the threshold is off.

    ``threshold`` defaults to :func:`configured_threshold`.
    """
    if threshold is None:
        threshold = configured_threshold()
    if not threshold or thread.ident is None:
        return None
    return LoopWatch(loop, thread, threshold)
