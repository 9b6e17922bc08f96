"""Random borrow / return / cancel / timeout / close sequences never break the pool's books.

After every step: ``available + in_use == total <= max_size``, every lease held is
counted, waiters are served first-in first-out, and a close wakes every waiter
with ``PoolClosed`` and leaves no socket open.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neopool import (
    EventLoopConnectionPool,
    Neo4jConnectionConfig,
    PoolClosed,
    PooledConnectionManager,
    PoolTimeout,
)
from neopool._release import driver_socket_count
from neopool.loop_pool import PoolState
from neopool.testing import BoltTarget
from polling import eventually_async

pytestmark = pytest.mark.timeout(240)

#: How long a "short" borrow waits before PoolTimeout, and how long a tick lets time pass.
SHORT = 0.002
TICK = 0.006

Step = tuple[str, int]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("borrow"), st.just(0)),
        st.tuples(st.just("borrow_short"), st.just(0)),
        st.tuples(st.sampled_from(["return", "cancel", "handoff_cancel"]), st.integers(0, 7)),
        st.tuples(st.just("tick"), st.just(0)),
        st.tuples(st.just("close"), st.just(0)),
    ),
    min_size=1,
    max_size=30,
)


@dataclass
class Borrower:
    number: int
    task: asyncio.Task[None] | None = None
    lease: PooledConnectionManager | None = None
    outcome: str = "waiting"  # -> holding -> returned | timeout | closed | cancelled
    give_back: asyncio.Event = field(default_factory=asyncio.Event)


class Model:
    """Runs borrowers against a real pool and checks its books after every step."""

    def __init__(self, pool: EventLoopConnectionPool) -> None:
        self.pool = pool
        self.borrowers: list[Borrower] = []
        self.waiting: list[int] = []  # borrowers inside borrow(), in arrival order

    async def borrower(self, me: Borrower, timeout: float | None) -> None:
        self.waiting.append(me.number)
        try:
            me.lease = await self.pool.borrow(timeout)
        except PoolTimeout:
            me.outcome = "timeout"
            return
        except PoolClosed:
            me.outcome = "closed"
            return
        except asyncio.CancelledError:
            me.outcome = "cancelled"
            raise
        finally:
            self.waiting.remove(me.number)
        # First come, first served: nobody who arrived earlier is still waiting.
        assert all(other > me.number for other in self.waiting), "a waiter was overtaken"
        me.outcome = "holding"
        try:
            await me.give_back.wait()
        finally:
            if me.outcome == "holding":  # not already returned for it by the model
                await self.pool.return_connection(me.lease)
                me.outcome = "returned"

    def start(self, timeout: float | None) -> None:
        me = Borrower(len(self.borrowers))
        me.task = asyncio.ensure_future(self.borrower(me, timeout))
        self.borrowers.append(me)

    def pick(self, states: tuple[str, ...], index: int) -> Borrower | None:
        chosen = [b for b in self.borrowers if b.outcome in states]
        return chosen[index % len(chosen)] if chosen else None

    async def apply(self, action: str, index: int) -> None:
        if action == "borrow":
            self.start(None)
        elif action == "borrow_short":
            self.start(SHORT)
        elif action == "return":
            holder = self.pick(("holding",), index)
            if holder is not None:
                holder.give_back.set()
        elif action == "cancel":
            target = self.pick(("waiting", "holding"), index)
            if target is not None and target.task is not None:
                target.task.cancel()
        elif action == "handoff_cancel":
            # A lease is handed to the first waiter, which is cancelled before it wakes up.
            holder = self.pick(("holding",), index)
            first = self.pick(("waiting",), 0)
            if holder is not None and first is not None and first.task is not None:
                assert holder.lease is not None
                holder.outcome = "returned"
                await self.pool.return_connection(holder.lease)  # never suspends
                first.task.cancel()
                holder.give_back.set()
        elif action == "tick":
            await asyncio.sleep(TICK)
        elif action == "close":
            waiting_before = [b for b in self.borrowers if b.outcome == "waiting"]
            await self.pool.close(timeout=0)
            await settle()
            assert all(b.outcome == "closed" for b in waiting_before), "a waiter was not woken"
            assert self.pool.waiting == 0
            await assert_released(self.pool)
        await settle()

    def check(self) -> None:
        pool = self.pool
        assert pool.available + pool.in_use == pool.total <= pool.max_size
        holding = [b for b in self.borrowers if b.outcome == "holding"]
        assert pool.in_use == len(holding), "a lease was lost or double-counted"
        assert all(b.lease is not None and b.lease.in_use for b in holding)
        if not pool.closed:
            assert pool.waiting == sum(b.outcome == "waiting" for b in self.borrowers)
            if pool.waiting:
                assert pool.in_use == pool.max_size, "someone waits while a lease is free"

    async def finish(self) -> None:
        for b in self.borrowers:
            b.give_back.set()
        await settle()
        for b in self.borrowers:
            if b.task is not None and not b.task.done():
                b.task.cancel()
        await asyncio.gather(*(b.task for b in self.borrowers if b.task), return_exceptions=True)
        assert self.pool.in_use == 0
        assert self.pool.waiting == 0
        self.check()


async def settle() -> None:
    """Let every ready callback run (hand-offs take a few loop iterations)."""
    for _ in range(12):
        await asyncio.sleep(0)


async def assert_released(pool: EventLoopConnectionPool) -> None:
    """The pool is closed and its driver holds no socket any more."""
    assert pool.state is PoolState.CLOSED
    driver = pool.driver
    assert driver is not None  # opened up front by the scenario
    assert await eventually_async(lambda: driver_socket_count(driver) == 0)


async def scenario(config: Neo4jConnectionConfig, actions: list[Step]) -> None:
    pool = EventLoopConnectionPool(config)
    await pool.get_driver()  # opened up front, so borrows never await I/O
    model = Model(pool)
    try:
        for action, index in actions:
            await model.apply(action, index)
            model.check()
        await model.finish()
    finally:
        await pool.close(timeout=0)
    await assert_released(pool)


@pytest.fixture(scope="module")
def small_pool_config(neopool_bolt: BoltTarget) -> Neo4jConnectionConfig:
    return neopool_bolt.config(pool_max_size=3, pool_min_size=1, borrow_timeout=30.0)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(actions=steps, max_size=st.integers(1, 3))
def test_random_borrow_return_cancel_timeout_close_keeps_the_books_straight(
    small_pool_config: Neo4jConnectionConfig, actions: list[Step], max_size: int
) -> None:
    config = small_pool_config.model_copy(
        update={"pool_max_size": max_size, "pool_min_size": min(1, max_size)}
    )
    asyncio.run(scenario(config, actions))
