"""What a loop pool reports about itself, and when it warns."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import NamedTuple, TypedDict

__all__ = ["PoolStats", "ProcessTotals"]

logger = logging.getLogger("neopool")


class PoolStats(TypedDict):
    """A snapshot of one event loop's pool.

    The first four keys are the design note's; the rest say how the pool has
    been used since it was created.
    """

    available: int  #: leases ready to hand out
    in_use: int  #: leases held by borrowers
    total: int  #: available + in_use (<= max_size)
    max_size: int  #: pool_max_size
    min_size: int  #: pool_min_size
    waiting: int  #: borrowers waiting for a lease now
    borrows: int  #: leases handed out, ever
    timeouts: int  #: borrowers that gave up with PoolTimeout
    drivers_created: int  #: drivers this loop has created (1 unless replaced)
    wait_ms_total: float  #: time borrowers spent waiting, summed
    max_wait_ms: float  #: the longest single wait
    reuse_ratio: float  #: borrows served without creating a driver, as a fraction
    thread: str  #: name of the thread running the loop
    closed: bool  #: whether the pool was closed


class ProcessTotals(TypedDict):
    """What this process's pools have done since it started (or was forked).

    Unlike :class:`PoolStats`, which describes the live pools, these counts
    keep the pools that are gone: where every task makes its own event loop,
    ``loops_served`` and ``drivers_created`` grow with every task while the
    per-loop stats show only the loops alive now.
    """

    pid: int  #: the process counted
    loops_served: int  #: event loops that were given a pool (one pool per loop's life)
    pools_closed: int  #: pools ended (closed, or released with their loop)
    drivers_created: int  #: drivers opened
    drivers_closed: int  #: drivers closed, or their sockets released, with their pool
    borrows: int  #: leases handed out
    loop_blocks: int  #: times the process loop was seen blocked past blocked_loop_threshold


class ProcessCounters:
    """The running counts behind :class:`ProcessTotals`; one per process (:data:`PROCESS`).

    Rare events (a loop served, a driver opened, a pool ended) count under a
    lock. ``borrows`` is a bare ``+= 1`` on the borrow path, where a lock would
    cost more than the count is worth: on Python 3.10 two threads borrowing at
    the same instant may, rarely, count once (each pool's own ``borrows`` is
    exact). A forked child starts again from zero.
    """

    __slots__ = (
        "_lock",
        "borrows",
        "drivers_closed",
        "drivers_created",
        "loop_blocks",
        "loops_served",
        "pid",
        "pools_closed",
    )

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start from zero (a forked child: its parent's pools are not its own)."""
        self._lock = threading.Lock()
        self.pid = os.getpid()
        self.loops_served = 0
        self.pools_closed = 0
        self.drivers_created = 0
        self.drivers_closed = 0
        self.borrows = 0
        self.loop_blocks = 0

    def loop_served(self) -> None:
        """An event loop got a pool."""
        with self._lock:
            self.loops_served += 1

    def driver_created(self) -> None:
        """A pool opened a driver."""
        with self._lock:
            self.drivers_created += 1

    def pool_ended(self, pid: int, drivers: int) -> None:
        """A pool made in process ``pid`` ended, and with it the ``drivers`` it had opened.

        A pool a forked child inherited is not the child's: not counted.
        """
        if pid != self.pid:
            return
        with self._lock:
            self.pools_closed += 1
            self.drivers_closed += drivers

    def loop_blocked(self) -> None:
        """The process loop was seen blocked past its threshold."""
        with self._lock:
            self.loop_blocks += 1

    def totals(self) -> ProcessTotals:
        """A snapshot (safe from any thread)."""
        with self._lock:
            return ProcessTotals(
                pid=self.pid,
                loops_served=self.loops_served,
                pools_closed=self.pools_closed,
                drivers_created=self.drivers_created,
                drivers_closed=self.drivers_closed,
                borrows=self.borrows,
                loop_blocks=self.loop_blocks,
            )


#: This process's counters (the same object for its whole life: a fork resets it in place,
#: first thing in the fork hook's first step, before the inherited pools end).
PROCESS = ProcessCounters()


class Say(NamedTuple):
    """What :meth:`SayOnce.occurred` returns when a line is due: what to add to it."""

    #: Occurrences not logged since the previous line.
    suppressed: int
    #: Seconds since the previous line; ``None`` before the first one.
    since_s: float | None

    def note(self, what: str) -> str:
        """`` (N more <what> since the last such warning T s ago were not logged)``, or ``""``."""
        if not self.suppressed:
            return ""
        since = f" {self.since_s:.0f} s ago" if self.since_s is not None else ""
        return (
            f" ({self.suppressed} more {what} since the last such warning{since} were not logged)"
        )


class SayOnce:
    """Rate limiter for the warning about one condition: say it once (contract rule 8).

    Tell it each time the condition occurs (:meth:`occurred`) and each time it
    clears (:meth:`cleared`). A line is due when an episode starts; the episode
    lasts until the condition has stayed clear for :attr:`QUIET_S` seconds, so
    a condition that flickers (a busy pool dipping below its threshold between
    a return and the next borrow) is one episode, not one per flicker. And
    whatever the episodes, there is at most one line per :attr:`INTERVAL_S`:
    an episode that starts sooner is said once the interval has passed, if it
    is still going on. Every occurrence not said is counted, and the next line
    says how many there were.

    Not thread-safe: use it from one event loop, or under a lock. The clock is
    read only in :meth:`occurred` and in the first :meth:`cleared` after one.
    """

    #: At most one line per this many seconds.
    INTERVAL_S = 60.0
    #: The condition must stay clear this long for its episode to end.
    QUIET_S = 10.0

    __slots__ = (
        "_clear_since",
        "_clock",
        "_in_episode",
        "_last_line_at",
        "_reported",
        "_suppressed",
        "interval_s",
        "occurrences",
        "quiet_s",
    )

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        interval_s: float | None = None,
        quiet_s: float | None = None,
    ) -> None:
        self._clock = clock
        self.interval_s = self.INTERVAL_S if interval_s is None else interval_s
        self.quiet_s = self.QUIET_S if quiet_s is None else quiet_s
        #: Occurrences ever counted, said or not.
        self.occurrences = 0
        self._suppressed = 0
        self._last_line_at: float | None = None
        self._in_episode = False
        self._reported = False  # whether the current episode was said
        self._clear_since: float | None = None

    @property
    def suppressed(self) -> int:
        """Occurrences not said since the last line."""
        return self._suppressed

    def occurred(self, count: int = 1) -> Say | None:
        """The condition occurred (``count`` times): a :class:`Say` if a line is due, else None."""
        now = self._clock()
        self.occurrences += count
        clear_since, self._clear_since = self._clear_since, None
        if not self._in_episode or (clear_since is not None and now - clear_since >= self.quiet_s):
            self._in_episode, self._reported = True, False  # a new episode
        last = self._last_line_at
        if self._reported or (last is not None and now - last < self.interval_s):
            self._suppressed += count
            return None
        self._reported = True
        self._last_line_at = now
        say = Say(self._suppressed, None if last is None else now - last)
        self._suppressed = 0
        return say

    def cleared(self) -> None:
        """The condition no longer holds: its episode ends if it stays so for the quiet period."""
        if self._in_episode and self._clear_since is None:
            self._clear_since = self._clock()


class UtilisationMonitor:
    """Logs when a pool crosses its utilisation threshold or runs dry: once per episode.

    Each condition has its own :class:`SayOnce`: a busy pool whose utilisation
    dips below the threshold between a return and the next borrow is one
    episode, and logs one line, not one per borrow; and it logs at most one
    line a minute per condition, saying how many crossings it did not log.
    """

    __slots__ = (
        "_above",
        "_busy",
        "_dry",
        "_exhausted",
        "_lost",
        "_max_size",
        "alerted",
        "busy_above",
        "loop_id",
    )

    def __init__(
        self,
        loop_id: str,
        threshold: float,
        max_size: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: The loop id the warnings name (settable: a pool may learn its loop later).
        self.loop_id = loop_id
        self._max_size = max_size
        #: More leases in use than this is high utilisation.
        self.busy_above = threshold * max_size
        self._above = False
        self._exhausted = False
        self._busy = SayOnce(clock)
        self._dry = SayOnce(clock)
        self._lost = SayOnce(clock, quiet_s=0.0)  # events, not a state: the interval alone
        #: Whether a condition holds: then every change must be observed, to see it clear.
        self.alerted = False

    @property
    def utilisation(self) -> SayOnce:
        """The limiter of the high-utilisation warning (occurrences: threshold crossings)."""
        return self._busy

    @property
    def exhaustion(self) -> SayOnce:
        """The limiter of the exhaustion warning (occurrences: times the pool ran dry)."""
        return self._dry

    @property
    def lost_leases(self) -> SayOnce:
        """The limiter of the lost-lease warning (occurrences: leases)."""
        return self._lost

    def observe(self, in_use: int) -> None:
        """Called with the new figure after a borrow or return that could matter.

        That is every one above ``busy_above`` or while :attr:`alerted`; below
        the threshold and with no alert in force, nothing here would change.
        Only a crossing of the threshold reads the clock.
        """
        above = in_use > self.busy_above
        if above != self._above:
            self._above = above
            if not above:
                self._busy.cleared()
            elif (say := self._busy.occurred()) is not None:
                max_size = self._max_size
                logger.warning(
                    "neopool: high utilisation on event loop %s: %d of %d leases in use (%.0f%%)%s",
                    self.loop_id,
                    in_use,
                    max_size,
                    100.0 * in_use / max_size,
                    say.note("crossings of the threshold"),
                )
        if self._exhausted and in_use < self._max_size:
            self._exhausted = False
            self._dry.cleared()
        self.alerted = above or self._exhausted

    def exhausted(self, waiting: int) -> None:
        """Called when a borrower has to wait because every lease is out."""
        if self._exhausted:
            return
        self._exhausted = self.alerted = True
        say = self._dry.occurred()
        if say is not None:
            logger.warning(
                "neopool: pool exhausted on event loop %s: all %d leases in use, "
                "%d borrower(s) waiting; consider raising pool_max_size%s",
                self.loop_id,
                self._max_size,
                waiting,
                say.note("times the pool ran dry"),
            )

    def leases_lost(self, sites: Iterable[str | None]) -> None:
        """Leases whose holders were garbage-collected unreturned came back: one line per batch.

        :func:`report_lost_leases` for this pool, at most one line a minute: a
        later line counts the leases not reported in between.
        """
        report_lost_leases(self.loop_id, sites, limiter=self._lost)


class LoopChurnMonitor:
    """Logs when event loops keep being thrown away after a moment: once per episode.

    A pool lives as long as its loop. Where every task gets a new loop
    (``asyncio.run`` in each Celery task, the design note's own mistake), every
    task opens a new driver and nothing is reused; the pool works, so nothing
    else would say so. An episode is a run of churned pools; it ends when a
    pool lives long enough (or serves enough borrows) and none churns for
    :attr:`SayOnce.QUIET_S`. At most one line per :attr:`SayOnce.INTERVAL_S`.
    """

    #: A pool that closed younger than this, with at most ``FEW_BORROWS`` borrows, was churned.
    SHORT_LIVED_S = 5.0
    FEW_BORROWS = 3
    #: Churned pools in a row, across the process, before the warning.
    IN_A_ROW = 10

    __slots__ = ("_lock", "_say", "_streak")

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._streak = 0
        self._say = SayOnce(clock)

    @property
    def limiter(self) -> SayOnce:
        """The limiter of the churn warning (occurrences: churned pools in a streak)."""
        return self._say

    def pool_ended(self, lifetime_s: float, borrows: int) -> None:
        """Called once for every pool that closed or was released with its dead loop."""
        churned = lifetime_s < self.SHORT_LIVED_S and borrows <= self.FEW_BORROWS
        with self._lock:
            if not churned:
                self._streak = 0
                self._say.cleared()
                return
            self._streak += 1
            if self._streak < self.IN_A_ROW:
                return
            say = self._say.occurred()
        if say is None:
            return
        logger.warning(
            "neopool: the last %d event loops each closed within %.0f s of opening their "
            "pool, after at most %d borrows: every new loop opens a new driver (TCP, Bolt "
            "handshake, authentication), so nothing is reused between them. If each task "
            "calls asyncio.run, run it with neopool.run() or as a neopool.celery.AsyncTask, "
            "so one loop per thread serves every task. (Logged at most once every %.0f s; "
            "expected in a test suite with a loop per test.)%s",
            self.IN_A_ROW,
            self.SHORT_LIVED_S,
            self.FEW_BORROWS,
            self._say.interval_s,
            say.note("short-lived loops"),
        )


#: Borrow sites named in one leak warning; the rest are counted.
MAX_LEAK_SITES = 10
_ADVICE = "Return connections with 'async with' or in a finally block."


def report_leaks(
    loop_id: str,
    sites: Iterable[str | None],
    *,
    closed_by: str = "",
    limiter: SayOnce | None = None,
) -> None:
    """Log the leases still in use when their pool was closed: one line, whatever their number.

    The pool was closed under their holders (``closed_by`` says by what, when
    known): a holder may well have been at work still. ``sites`` has the
    ``borrowed_at`` of each such lease (empty or None where unknown). The line
    gives the number of leases and each distinct borrow site once, the most
    frequent first, with its count. Pass a ``limiter`` (one per process, say)
    to rate-limit reports across pools too.
    """
    counted = _counted(sites, limiter, "leases in use at a close")
    if counted is None:
        return
    counts, total, note = counted
    by = f" by {closed_by}" if closed_by else ""
    if total == 1:
        what, where = "a lease was", f"it was borrowed at {next(iter(counts))}"
    else:
        what, where = f"{total} leases were", f"they were borrowed at {_ranked(counts)}"
    logger.warning(
        "neopool: the pool of event loop %s was closed%s while %s still in use; %s. %s%s",
        loop_id,
        by,
        what,
        where,
        _CLOSED_UNDER_ADVICE,
        note,
    )


#: What to do about leases in use when their pool was closed.
_CLOSED_UNDER_ADVICE = (
    "Using such a lease from now on fails with PoolClosed. Close pools after the work "
    "that borrows from them has ended, or give the close a longer timeout; code that "
    "keeps a lease should return it with 'async with' or in a finally block."
)


def report_lost_leases(
    loop_id: str, sites: Iterable[str | None], *, limiter: SayOnce | None = None
) -> None:
    """Log leases whose holders were garbage-collected without returning them: one line.

    For leases already taken back into their pool; otherwise as
    :func:`report_leaks`. :meth:`UtilisationMonitor.leases_lost` calls this
    with the pool's own limiter.
    """
    _report(
        loop_id,
        sites,
        limiter,
        "was never returned: what held it was garbage-collected, and the lease is back in "
        "its pool. It was borrowed at",
        "were never returned: what held them was garbage-collected, and the leases are back "
        "in their pool. They were borrowed at",
    )


def _report(
    loop_id: str,
    sites: Iterable[str | None],
    limiter: SayOnce | None,
    one: str,
    many: str,
) -> None:
    counted = _counted(sites, limiter, "leaked leases")
    if counted is None:
        return
    counts, total, note = counted
    if total == 1:
        logger.warning(
            "neopool: a lease of event loop %s %s %s. %s%s",
            loop_id,
            one,
            next(iter(counts)),
            _ADVICE,
            note,
        )
        return
    logger.warning(
        "neopool: %d leases of event loop %s %s %s. %s%s",
        total,
        loop_id,
        many,
        _ranked(counts),
        _ADVICE,
        note,
    )


def _counted(
    sites: Iterable[str | None], limiter: SayOnce | None, what: str
) -> tuple[Counter[str], int, str] | None:
    """The sites counted, their total and the limiter's note on ``what``; ``None``: say nothing.

    Nothing to say when there is no site, or when ``limiter`` holds the line back.
    """
    counts = Counter(site or "<unknown>" for site in sites)
    total = sum(counts.values())
    if not total:
        return None
    note = ""
    if limiter is not None:
        say = limiter.occurred(total)
        limiter.cleared()  # an event: nothing goes on after it
        if say is None:
            return None
        note = say.note(what)
    return counts, total, note


def _ranked(counts: Counter[str]) -> str:
    """Each site once with its count, the most frequent first, the first MAX_LEAK_SITES."""
    ranked = counts.most_common()
    named = "; ".join(f"{site} ({n}x)" for site, n in ranked[:MAX_LEAK_SITES])
    if len(ranked) > MAX_LEAK_SITES:
        rest = sum(n for _, n in ranked[MAX_LEAK_SITES:])
        named += f"; and {rest} more from {len(ranked) - MAX_LEAK_SITES} other places"
    return named
