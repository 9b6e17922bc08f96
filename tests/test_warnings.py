"""Say it once (contract rule 8): each condition's warning once per episode, rate-limited.

Most tests drive the monitors with a fake clock through what a pool would tell
them; the last one keeps a real pool on the real server busy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import pytest

from neopool import Neo4jConnectionConfig
from neopool.stats import (
    MAX_LEAK_SITES,
    LoopChurnMonitor,
    SayOnce,
    UtilisationMonitor,
    report_leaks,
    report_lost_leases,
)
from neopool.testing.busy_load import keep_busy

INTERVAL = SayOnce.INTERVAL_S
QUIET = SayOnce.QUIET_S


class FakeClock:
    """A monotonic clock that moves only when told, and counts its reads."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="neopool")
    return caplog


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def suppressed_in(line: str, what: str) -> int:
    found = re.search(rf"\((\d+) more {what} since the last such warning", line)
    assert found is not None, line
    return int(found.group(1))


class SimulatedPool:
    """Tells a monitor what EventLoopConnectionPool tells it, in the same order."""

    def __init__(self, monitor: UtilisationMonitor, max_size: int) -> None:
        self.monitor = monitor
        self.max_size = max_size
        self.in_use = 0
        self.waiting = 0
        self.observed = 0

    def _observe(self) -> None:  # EventLoopConnectionPool._observe_utilisation
        if self.in_use > self.monitor.busy_above or self.monitor.alerted:
            self.observed += 1
            self.monitor.observe(self.in_use)

    def borrow(self) -> None:
        if self.in_use == self.max_size:
            self.waiting += 1
            self.monitor.exhausted(self.waiting)
            return
        self.in_use += 1
        self._observe()

    def give_back(self) -> None:
        if self.waiting:  # handed straight to the first waiter
            self.waiting -= 1
            self._observe()
            return
        self.in_use -= 1
        self._observe()


# -- the limiter ----------------------------------------------------------------------
def test_a_flickering_condition_is_one_episode_said_once(clock: FakeClock) -> None:
    say = SayOnce(clock)
    first = say.occurred()
    assert first is not None
    assert (first.suppressed, first.since_s) == (0, None)
    assert first.note("crossings") == ""
    for _ in range(1000):  # clear for a moment, back again: the same episode
        clock.advance(0.001)
        say.cleared()
        clock.advance(0.001)
        assert say.occurred() is None
    clock.advance(INTERVAL)  # long after the interval, but the episode never ended
    say.cleared()
    clock.advance(QUIET / 2)
    assert say.occurred() is None
    assert say.suppressed == 1001
    assert say.occurrences == 1002


def test_a_new_episode_after_the_quiet_period_is_said_with_the_count(clock: FakeClock) -> None:
    say = SayOnce(clock)
    assert say.occurred() is not None
    for _ in range(5):
        assert say.occurred() is None
    say.cleared()
    clock.advance(INTERVAL + 1)
    again = say.occurred()
    assert again is not None
    assert again.suppressed == 5
    assert again.since_s == pytest.approx(INTERVAL + 1)
    assert again.note("crossings") == (
        " (5 more crossings since the last such warning 61 s ago were not logged)"
    )
    assert say.suppressed == 0


def test_episodes_closer_than_the_interval_are_said_once_it_has_passed(
    clock: FakeClock,
) -> None:
    say = SayOnce(clock)
    assert say.occurred() is not None
    say.cleared()
    clock.advance(QUIET + 1)  # that episode is over ...
    assert say.occurred() is None  # ... but a new one so soon is not said yet
    clock.advance(INTERVAL - QUIET - 2)
    assert say.occurred() is None  # still going on, still inside the interval
    clock.advance(2)
    late = say.occurred()  # the interval has passed: it is said now, once
    assert late is not None
    assert late.suppressed == 2
    assert say.occurred() is None


def test_a_short_episode_inside_the_interval_waits_for_the_next_one(clock: FakeClock) -> None:
    say = SayOnce(clock)
    assert say.occurred() is not None
    say.cleared()
    clock.advance(QUIET + 1)
    assert say.occurred() is None  # a short second episode, not said
    say.cleared()
    clock.advance(10 * INTERVAL)
    third = say.occurred()
    assert third is not None
    assert third.suppressed == 1  # the next line tells of it


def test_the_limits_are_settable_per_instance(clock: FakeClock) -> None:
    say = SayOnce(clock, interval_s=1.0, quiet_s=0.5)
    assert say.occurred() is not None
    say.cleared()
    clock.advance(1.0)
    assert say.occurred() is not None


# -- utilisation --------------------------------------------------------------------------
def test_sustained_high_utilisation_with_dips_logs_one_line(
    clock: FakeClock, warnings: pytest.LogCaptureFixture
) -> None:
    """The bug: 9 of 10 leases busy; a return dips below the threshold, a borrow re-crosses."""
    monitor = UtilisationMonitor("L", 0.8, 10, clock=clock)
    pool = SimulatedPool(monitor, 10)
    for _ in range(9):
        pool.borrow()
    crossings = 1
    for _ in range(5 * 60 * 1000):  # five minutes, a return and a borrow every millisecond
        clock.advance(0.0005)
        pool.give_back()  # 8 of 10: below the threshold for a moment
        clock.advance(0.0005)
        pool.borrow()  # 9 of 10 again
        crossings += 1
    (line,) = lines(warnings, "high utilisation")
    assert line == "neopool: high utilisation on event loop L: 9 of 10 leases in use (90%)"
    assert monitor.utilisation.occurrences == crossings  # what used to be logged, one a line
    assert monitor.utilisation.suppressed == crossings - 1
    assert lines(warnings, "pool exhausted") == []

    for _ in range(9):  # the load goes away for a while, then comes back
        pool.give_back()
    clock.advance(QUIET + 1)
    for _ in range(9):
        pool.borrow()
    _, second = lines(warnings, "high utilisation")
    assert suppressed_in(second, "crossings of the threshold") == crossings - 1
    assert "since the last such warning 311 s ago" in second


def test_the_clock_is_read_only_when_the_threshold_is_crossed(clock: FakeClock) -> None:
    monitor = UtilisationMonitor("L", 0.8, 10, clock=clock)
    pool = SimulatedPool(monitor, 10)
    for _ in range(1000):  # 0 to 8 of 10 and back: below the threshold, never observed
        for _ in range(8):
            pool.borrow()
        for _ in range(8):
            pool.give_back()
    assert (pool.observed, clock.reads) == (0, 0)
    for _ in range(10):
        pool.borrow()
    reads = clock.reads
    for _ in range(1000):  # 10 to 9 of 10 and back: above the threshold throughout
        pool.give_back()
        pool.borrow()
    assert clock.reads == reads
    assert pool.observed > 2000


def test_exhaustion_episodes(clock: FakeClock, warnings: pytest.LogCaptureFixture) -> None:
    monitor = UtilisationMonitor("L", 0.8, 4, clock=clock)
    pool = SimulatedPool(monitor, 4)
    for _ in range(4):
        pool.borrow()
    for _ in range(50):  # a queue of waiters, each served as a lease comes back
        pool.borrow()
        clock.advance(0.01)
    for _ in range(50):
        pool.give_back()
        clock.advance(0.01)
    (line,) = lines(warnings, "pool exhausted")
    assert line == (
        "neopool: pool exhausted on event loop L: all 4 leases in use, 1 borrower(s) "
        "waiting; consider raising pool_max_size"
    )

    for _ in range(200):  # runs dry again and again, a lease back in between
        pool.give_back()  # 3 of 4
        clock.advance(0.01)
        pool.borrow()  # 4 of 4
        pool.borrow()  # a waiter: dry again
        pool.give_back()  # served
        clock.advance(0.01)
    assert len(lines(warnings, "pool exhausted")) == 1
    assert monitor.exhaustion.suppressed == 200

    for _ in range(4):
        pool.give_back()
    clock.advance(QUIET + 1)  # over; a second episode starts inside the interval
    for _ in range(5):
        pool.borrow()
    assert len(lines(warnings, "pool exhausted")) == 1
    clock.advance(INTERVAL)  # it goes on past the interval, flickering: said now, once
    for _ in range(3):
        pool.give_back()  # the waiter is served
        pool.give_back()  # 3 of 4
        pool.borrow()
        pool.borrow()  # dry again
    _, again = lines(warnings, "pool exhausted")
    assert suppressed_in(again, "times the pool ran dry") == 201
    assert monitor.exhaustion.suppressed == 2
    # The same rule for utilisation, with its own limiter: its second episode is said too.
    assert len(lines(warnings, "high utilisation")) == 2


# -- churn ----------------------------------------------------------------------------------
def test_churn_is_said_once_per_episode_with_the_count(
    clock: FakeClock, warnings: pytest.LogCaptureFixture
) -> None:
    monitor = LoopChurnMonitor(clock=clock)
    for _ in range(LoopChurnMonitor.IN_A_ROW - 1):
        monitor.pool_ended(0.01, 1)
        clock.advance(0.02)
    assert lines(warnings, "nothing is reused") == []
    for _ in range(500):  # a loop per task, task after task
        monitor.pool_ended(0.01, 1)
        clock.advance(0.02)
    (first,) = lines(warnings, "nothing is reused")
    assert "neopool.run()" in first
    assert "at most once every 60 s" in first
    assert monitor.limiter.suppressed == 499

    monitor.pool_ended(3600.0, 10_000)  # a long-lived pool: the pattern is broken ...
    for _ in range(2 * LoopChurnMonitor.IN_A_ROW):  # ... but only for a moment
        monitor.pool_ended(0.01, 1)
    assert len(lines(warnings, "nothing is reused")) == 1

    monitor.pool_ended(3600.0, 10_000)
    clock.advance(INTERVAL)  # a real pause, then churn again
    for _ in range(3 * LoopChurnMonitor.IN_A_ROW):
        monitor.pool_ended(0.01, 1)
    _, second = lines(warnings, "nothing is reused")
    assert suppressed_in(second, "short-lived loops") == 499 + LoopChurnMonitor.IN_A_ROW + 1


# -- leaks ----------------------------------------------------------------------------------
SITE_A = "/app/tasks.py:12 in ingest"
SITE_B = "/app/tasks.py:40 in query"


def test_many_leaks_at_once_are_one_line_naming_each_site_once(
    warnings: pytest.LogCaptureFixture,
) -> None:
    report_leaks("L", [SITE_A] * 30 + [SITE_B] * 7 + [""])
    (line,) = lines(warnings, "still in use")
    assert line.startswith("neopool: the pool of event loop L was closed while 38 leases were")
    assert f"{SITE_A} (30x); {SITE_B} (7x); <unknown> (1x)" in line
    assert line.count(SITE_A) == 1
    assert "'async with'" in line


def test_one_leak_is_one_line_with_its_site(warnings: pytest.LogCaptureFixture) -> None:
    report_leaks("L", [SITE_A], closed_by="close_all_pools()")
    report_leaks("L", [])  # nothing leaked: nothing said
    (line,) = lines(warnings, "still in use")
    # The pool was closed under the holder: the line says so, and by what.
    assert line.startswith(
        "neopool: the pool of event loop L was closed by close_all_pools() while a lease "
        "was still in use"
    )
    assert f"borrowed at {SITE_A}." in line
    assert "PoolClosed" in line
    assert "never returned" not in line


def test_leak_sites_beyond_the_limit_are_counted(warnings: pytest.LogCaptureFixture) -> None:
    sites = [f"/app/t.py:{n} in f" for n in range(MAX_LEAK_SITES + 5)] * 2
    report_leaks("L", sites)
    (line,) = lines(warnings, "still in use")
    assert line.count("/app/t.py:") == MAX_LEAK_SITES
    assert "and 10 more from 5 other places" in line


def test_leak_reports_across_pools_can_share_a_limiter(
    clock: FakeClock, warnings: pytest.LogCaptureFixture
) -> None:
    limiter = SayOnce(clock)
    for n in range(20):  # pool after pool, each leaking
        report_leaks(f"L{n}", [SITE_A, SITE_B], limiter=limiter)
        clock.advance(1.0)
    assert len(lines(warnings, "still in use")) == 1
    clock.advance(INTERVAL)
    report_leaks("L99", [SITE_A], limiter=limiter)
    _, second = lines(warnings, "still in use")
    assert suppressed_in(second, "leases in use at a close") == 38


def test_leases_lost_by_their_holders_are_reported_per_batch(
    warnings: pytest.LogCaptureFixture,
) -> None:
    report_lost_leases("L", [SITE_A])
    report_lost_leases("L", [SITE_A, SITE_B, SITE_A])
    one, many = lines(warnings, "never returned")
    assert one.startswith("neopool: a lease of event loop L was never returned: what held it")
    assert f"back in its pool. It was borrowed at {SITE_A}." in one
    assert many.startswith("neopool: 3 leases of event loop L were never returned")
    assert f"They were borrowed at {SITE_A} (2x); {SITE_B} (1x)." in many


def test_a_steady_leak_is_reported_once_a_minute_per_pool(
    clock: FakeClock, warnings: pytest.LogCaptureFixture
) -> None:
    monitor = UtilisationMonitor("", 0.8, 10, clock=clock)
    monitor.loop_id = "L"  # a pool may learn its loop after it was made
    for _ in range(100):  # a lease lost every second
        monitor.leases_lost([SITE_A])
        clock.advance(1.0)
    first, second = lines(warnings, "never returned")
    assert "event loop L was never returned" in first
    assert suppressed_in(second, "leaked leases") == 59
    assert monitor.lost_leases.occurrences == 100


# -- a real pool, kept busy ---------------------------------------------------------------
@pytest.mark.timing  # 100 borrows within its 2 s of load
async def test_a_pool_kept_above_its_threshold_warns_once(
    configure: Callable[..., Neo4jConnectionConfig], warnings: pytest.LogCaptureFixture
) -> None:
    configure(pool_max_size=10, utilisation_warning=0.8)
    borrows, utilisation = await keep_busy(workers=9, seconds=2.0)
    assert utilisation >= 0.85  # 9 of 10 held, but for the moment between return and borrow
    assert borrows >= 100  # each one crossed the threshold: it used to be a line each
    assert 1 <= len(lines(warnings, "high utilisation")) <= 2
    assert lines(warnings, "pool exhausted") == []
