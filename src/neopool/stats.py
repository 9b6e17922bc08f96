"""What a loop pool reports about itself, and when it warns."""

from __future__ import annotations

import logging
import threading
from typing import TypedDict

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


class UtilisationMonitor:
    """Logs once when a pool crosses its utilisation threshold or runs dry.

    It re-arms only after utilisation falls back, so a busy pool logs one line
    per episode rather than one per borrow.
    """

    __slots__ = ("_above", "_exhausted", "_loop_id", "_max_size", "alerted", "busy_above")

    def __init__(self, loop_id: str, threshold: float, max_size: int) -> None:
        self._loop_id = loop_id
        self._max_size = max_size
        #: More leases in use than this is high utilisation.
        self.busy_above = threshold * max_size
        self._above = False
        self._exhausted = False
        #: Whether an alert is in force: then every change must be observed, to re-arm it.
        self.alerted = False

    def observe(self, in_use: int) -> None:
        """Called with the new figure after a borrow or return that could matter.

        That is every one above ``busy_above`` or while :attr:`alerted`; below
        the threshold and with no alert in force, nothing here would change.
        """
        max_size = self._max_size
        above = in_use > self.busy_above
        if above and not self._above:
            logger.warning(
                "neopool: high utilisation on event loop %s: %d of %d leases in use (%.0f%%)",
                self._loop_id,
                in_use,
                max_size,
                100.0 * in_use / max_size,
            )
        self._above = above
        if in_use < max_size:
            self._exhausted = False
        self.alerted = self._above or self._exhausted

    def exhausted(self, waiting: int) -> None:
        """Called when a borrower has to wait because every lease is out."""
        if not self._exhausted:
            self._exhausted = self.alerted = True
            logger.warning(
                "neopool: pool exhausted on event loop %s: all %d leases in use, "
                "%d borrower(s) waiting; consider raising pool_max_size",
                self._loop_id,
                self._max_size,
                waiting,
            )


class LoopChurnMonitor:
    """Logs once per process when event loops keep being thrown away after a moment.

    A pool lives as long as its loop. Where every task gets a new loop
    (``asyncio.run`` in each Celery task, the design note's own mistake), every
    task opens a new driver and nothing is reused; the pool works, so nothing
    else would say so.
    """

    #: A pool that closed younger than this, with at most ``FEW_BORROWS`` borrows, was churned.
    SHORT_LIVED_S = 5.0
    FEW_BORROWS = 3
    #: Churned pools in a row, across the process, before the warning.
    IN_A_ROW = 10

    __slots__ = ("_lock", "_streak", "_warned")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streak = 0
        self._warned = False

    def pool_ended(self, lifetime_s: float, borrows: int) -> None:
        """Called once for every pool that closed or was released with its dead loop."""
        churned = lifetime_s < self.SHORT_LIVED_S and borrows <= self.FEW_BORROWS
        with self._lock:
            self._streak = self._streak + 1 if churned else 0
            if self._warned or self._streak < self.IN_A_ROW:
                return
            self._warned = True
        logger.warning(
            "neopool: the last %d event loops each closed within %.0f s of opening their "
            "pool, after at most %d borrows: every new loop opens a new driver (TCP, Bolt "
            "handshake, authentication), so nothing is reused between them. If each task "
            "calls asyncio.run, run it with neopool.run() or as a neopool.celery.AsyncTask, "
            "so one loop per thread serves every task. (Logged once per process; expected "
            "in a test suite with a loop per test.)",
            self.IN_A_ROW,
            self.SHORT_LIVED_S,
            self.FEW_BORROWS,
        )
