"""Random lifecycles across threads keep the lifecycle contract (design.md, "Lifecycle contract").

A hypothesis state machine runs two to four threads that each own an event loop
(some run theirs for ever and are driven with ``run_coroutine_threadsafe``, some
leave theirs idle and run it only on command, as a Celery thread would) plus a
thread on the runner's persistent loop (``neopool.run``). Its rules borrow,
return (maybe after a connectivity error, which replaces a fake driver), cancel a
waiting borrow, drop a lease unreturned, close every pool from one of the loops,
close every runner loop, end a thread without closing its loop (a new thread takes
its place), end a new thread while its driver is still opening, and set a new
configuration (with fake drivers, their ``close()`` may hang from then on).

After every step:

* every operation returned within its bound (each has a deadline; see :data:`SLACK`);
* every lending pool's books balance, ``available + in_use == total <= max_size``, and
  its leases out are exactly those the borrowers hold;
* after ``sweep()``, a loop that can never run again has its pools CLOSED and no driver
  of it holds a socket (``driver_socket_count(driver) == 0``; fake drivers hold real
  local sockets, and every one they ever opened must be closed or released);
* nothing escaped a finalizer, a weakref callback or a thread, and no driver was
  used from a loop other than its own.

The fake-driver run (:class:`neopool.testing.FakeDriverFactory`) explores many
sequences in seconds and shrinks a failure to a short one; a smaller run uses the
real driver against the embedded server and reports the failing sequence as found
(network timing makes shrinking it slow and unreliable).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import queue
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from neo4j import AsyncDriver
from neo4j.exceptions import ServiceUnavailable

import neopool
from neopool import (
    EventLoopConnectionPool,
    GlobalNeo4jConnectionPool,
    Neo4jConnectionConfig,
    PoolClosed,
    PooledConnectionManager,
    PoolTimeout,
)
from neopool._release import driver_socket_count
from neopool.loop_pool import PoolState, create_driver
from neopool.runner import close_all_loops, close_thread_loop
from neopool.testing import BoltTarget, FakeDriver, FakeDriverFactory, reset_registry
from polling import eventually, eventually_async

pytestmark = pytest.mark.timeout(300)

#: Scheduling slack on top of every bound (two cores, shared).
SLACK = 1.0
#: A borrow that gives up at once when no lease is free, and one that waits until something
#: happens. Both end or queue within the step that starts them, so the model's state
#: between steps does not depend on timing (hypothesis replays steps to shrink).
SHORT, LONG = 0.0, 30.0


async def settle() -> None:
    """Let every ready callback of this loop run (a hand-off takes a few iterations)."""
    for _ in range(10):
        await asyncio.sleep(0)


def books(pool: EventLoopConnectionPool) -> None:
    assert pool.available + pool.in_use == pool.total <= pool.max_size, repr(pool)


_configs: dict[tuple[Any, ...], Neo4jConnectionConfig] = {}


# -- the model -------------------------------------------------------------------------


@dataclass(eq=False)
class Borrow:
    """One borrower, as the model sees it; changed only on its loop's thread."""

    number: int
    timeout: float
    state: str = "waiting"  # -> holding -> returned | dropped; timeout | closed | cancelled
    pool: EventLoopConnectionPool | None = None
    lease: PooledConnectionManager | None = None
    task: asyncio.Task[None] | None = None
    error: BaseException | None = None

    def let_go(self, state: str) -> PooledConnectionManager:
        """The lease this borrower held; from now on it is in ``state`` and holds none."""
        lease, self.lease = self.lease, None
        assert lease is not None
        self.state = state
        return lease


class Keeper:
    """Holds a dropped lease in a reference cycle: only the garbage collector frees it."""

    def __init__(self, lease: PooledConnectionManager) -> None:
        self.lease = lease
        self.me = self


class Worker:
    """A thread that owns an event loop.

    ``running``: the loop runs for ever; work is sent with ``run_coroutine_threadsafe``.
    ``idle``: the loop runs only while a command runs (``run_until_complete``), so it
    is idle between steps, with borrowers left waiting on it.
    ``runner``: commands run through ``neopool.run`` on the runner's persistent loop.
    """

    def __init__(self, machine: LifecycleMachine, kind: str, number: int) -> None:
        self.machine = machine
        self.kind = kind
        self.name = f"neopool-prop-{kind}-{number}"
        self.borrows: list[Borrow] = []
        self.loops: list[asyncio.AbstractEventLoop] = []  # every loop it ran (runner: several)
        self.alive = True
        self.close_loop_on_exit = False
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self.thread.start()
        assert self._ready.wait(SLACK), f"{self.name} did not start"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.loops[-1]

    # -- the thread ---------------------------------------------------------------
    def _serve(self) -> None:
        if self.kind == "running":
            loop = asyncio.new_event_loop()
            self.loops.append(loop)
            loop.call_soon(self._ready.set)
            loop.run_forever()
            if self.close_loop_on_exit:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
            return  # otherwise the thread ends and its loop is left as it is
        loop = asyncio.new_event_loop() if self.kind == "idle" else None
        if loop is not None:
            self.loops.append(loop)
        self._ready.set()
        while True:
            job = self._commands.get()
            if job is None:
                break
            make, done, settled = job
            try:
                if loop is not None:
                    result = loop.run_until_complete(self._on_loop(make, settled))
                else:
                    result = neopool.run(self._on_loop(make, settled))
                done.set_result(result)
            except BaseException as exc:
                done.set_exception(exc)
        if self.close_loop_on_exit:
            if loop is not None:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
            else:
                close_thread_loop(timeout=self.machine.max_close_timeout)

    async def _on_loop(
        self, make: Callable[[], Coroutine[Any, Any, Any]], settled: bool = True
    ) -> Any:
        loop = asyncio.get_running_loop()
        if not self.loops or self.loops[-1] is not loop:
            self.loops.append(loop)  # the runner's loop was replaced since
        result = await make()
        if settled:
            await settle()
        return result

    # -- from the test's thread ---------------------------------------------------
    def call(
        self, make: Callable[[], Coroutine[Any, Any, Any]], bound: float, *, settled: bool = True
    ) -> Any:
        """Run ``make()`` on this thread's loop; it must return within ``bound`` seconds.

        ``settled``: let the loop run what became ready before returning.
        """
        assert self.alive
        started = time.monotonic()
        if self.kind == "running":
            done: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(
                self._on_loop(make, settled), self.loop
            )
        else:
            done = concurrent.futures.Future()
            self._commands.put((make, done, settled))
        try:
            result = done.result(timeout=bound)
        except concurrent.futures.TimeoutError:
            raise AssertionError(f"{self.name}: an operation did not return in {bound} s") from None
        took = time.monotonic() - started
        assert took <= bound, f"{self.name}: took {took:.2f} s, bound {bound} s"
        return result

    def end(self, bound: float, *, close_loop: bool) -> None:
        """End the thread (``close_loop=False``: without closing its loop, as users do)."""
        self.close_loop_on_exit = close_loop
        self.alive = False
        if self.kind == "running":
            self.loop.call_soon_threadsafe(self.loop.stop)
        else:
            self._commands.put(None)
        self.thread.join(bound)
        assert not self.thread.is_alive(), f"{self.name} did not end within {bound} s"
        if self.kind == "runner" and self.loops:  # the runner closes an ended thread's loop
            assert eventually(self.loop.is_closed, bound), f"{self.name}'s loop stayed open"

    # -- what runs on the loop ------------------------------------------------------
    async def borrower(self, rec: Borrow) -> None:
        try:
            pool = GlobalNeo4jConnectionPool().running_loop_pool()
            rec.pool = pool
            self.machine.pools_seen.append(pool)
            rec.lease = await pool.borrow(rec.timeout)
            rec.state = "holding"
        except PoolTimeout:
            rec.state = "timeout"
        except PoolClosed:
            rec.state = "closed"
        except asyncio.CancelledError:
            rec.state = "cancelled"
            raise
        except Exception as exc:  # anything else is a bug the invariants report
            rec.state = "error"
            rec.error = exc


# -- the state machine ---------------------------------------------------------------------


class LifecycleMachine(RuleBasedStateMachine):
    """Borrowers on several loops, while pools and loops end in every way the contract knows."""

    #: Set by each test before running the machine.
    fake: ClassVar[bool] = True
    target: ClassVar[BoltTarget | None] = None
    problems: ClassVar[list[Any]] = []  # exceptions out of finalizers, hooks and threads

    def __init__(self) -> None:
        super().__init__()
        self.workers: list[Worker] = []
        self.dead: list[Worker] = []
        self.pools_seen: list[EventLoopConnectionPool] = []
        self.numbers = 0
        self.max_close_timeout = 0.0
        self.fake_factory = FakeDriverFactory(sockets=True)  # real local sockets, no server
        self.real_drivers: list[tuple[AsyncDriver, asyncio.AbstractEventLoop]] = []
        reset_registry()
        self.problems.clear()
        if self.fake:
            GlobalNeo4jConnectionPool.set_driver_factory(self.fake_factory)
        else:
            GlobalNeo4jConnectionPool.set_driver_factory(self._real_driver)
        self._configure(max_size=2, min_size=1, close_timeout=0.05)

    # -- set-up ---------------------------------------------------------------------
    def _real_driver(self, config: Neo4jConnectionConfig) -> AsyncDriver:
        driver = create_driver(config)
        self.real_drivers.append((driver, asyncio.get_running_loop()))
        return driver

    def _configure(self, max_size: int, min_size: int, close_timeout: float) -> None:
        key = (max_size, min(min_size, max_size), close_timeout, self.target)
        config = _configs.get(key)
        if config is None:  # a config reads the environment: made once per distinct value
            settings_ = {
                "pool_max_size": max_size,
                "pool_min_size": min(min_size, max_size),
                "close_timeout": close_timeout,
                "borrow_timeout": LONG,
                "connection_timeout": 5.0,
                "connection_acquisition_timeout": 5.0,
            }
            if self.target is not None:
                config = self.target.config(**settings_)
            else:
                config = Neo4jConnectionConfig(
                    uri="bolt://127.0.0.1:7687", password="x", **settings_
                )
            _configs[key] = config
        self.max_close_timeout = max(self.max_close_timeout, close_timeout)
        GlobalNeo4jConnectionPool.set_config(config)

    @initialize(
        kinds=st.lists(st.sampled_from(["running", "idle"]), min_size=2, max_size=4),
        first_borrows=st.lists(st.integers(0, 3), min_size=5, max_size=5),
    )
    def start_threads(self, kinds: list[str], first_borrows: list[int]) -> None:
        for kind in [*kinds, "runner"]:
            self.workers.append(Worker(self, kind, len(self.workers)))
        for worker, count in zip(self.workers, first_borrows, strict=False):
            for _ in range(count):
                self.borrow(self.workers.index(worker), patient=True)

    def worker(self, index: int) -> Worker:
        return self.workers[index % len(self.workers)]

    def bound(self, seconds: float = 0.0) -> float:
        return seconds + SLACK

    # -- rules ------------------------------------------------------------------------
    @rule(index=st.integers(0, 4), patient=st.booleans())
    def borrow(self, index: int, patient: bool) -> None:
        """A borrower asks; on a loop of its own thread it may wait (the runner's may not)."""
        worker = self.worker(index)
        self.numbers += 1
        if worker.kind == "runner":
            rec = Borrow(self.numbers, SHORT)
            worker.borrows.append(rec)
            worker.call(lambda: worker.borrower(rec), self.bound(SHORT))
            return
        rec = Borrow(self.numbers, LONG if patient else SHORT)

        async def start() -> None:
            pool = GlobalNeo4jConnectionPool().running_loop_pool()
            queued = pool.waiting
            worker.borrows.append(rec)
            rec.task = asyncio.ensure_future(worker.borrower(rec))
            # Past opening the driver: holding a lease, failed, or in the queue.
            settled = await eventually_async(
                lambda: rec.state != "waiting" or pool.waiting > queued, timeout=SLACK
            )
            assert settled, f"{worker.name}: a borrow neither ended nor queued in {SLACK} s"

        worker.call(start, self.bound())

    def borrowers(self, state: str) -> list[tuple[Worker, Borrow]]:
        return [(w, b) for w in self.workers for b in list(w.borrows) if b.state == state]

    @precondition(lambda self: self.borrowers("holding"))
    @rule(which=st.integers(0, 15), failure=st.sampled_from([None, "blip", "broken"]))
    def give_back(self, which: int, failure: str | None) -> None:
        """A lease comes back, maybe after a connectivity error (``broken``: the driver is
        replaced at the next borrow, as its check fails; fake drivers only)."""
        holders = self.borrowers("holding")
        worker, rec = holders[which % len(holders)]

        async def give() -> None:
            lease = rec.let_go("returned")
            error = ServiceUnavailable("the network went away") if failure else None
            driver = lease.pool.driver
            if failure == "broken" and isinstance(driver, FakeDriver):
                driver.verify_error = error
            await GlobalNeo4jConnectionPool().return_connection(lease, error)

        worker.call(give, self.bound())

    @precondition(lambda self: any(b.task for _, b in self.borrowers("waiting")))
    @rule(which=st.integers(0, 15))
    def cancel_a_waiting_borrow(self, which: int) -> None:
        waiting = [(w, b) for w, b in self.borrowers("waiting") if b.task is not None]
        worker, rec = waiting[which % len(waiting)]

        async def cancel() -> None:
            assert rec.task is not None
            rec.task.cancel()
            await asyncio.wait([rec.task])

        worker.call(cancel, self.bound())

    @precondition(lambda self: self.borrowers("holding"))
    @rule(which=st.integers(0, 15))
    def drop_a_lease_unreturned(self, which: int) -> None:
        """Its holder is garbage-collected: the lease comes back to its pool."""
        holders = self.borrowers("holding")
        worker, rec = holders[which % len(holders)]

        async def drop() -> None:
            lease = rec.let_go("dropped")
            Keeper(lease)
            del lease
            gc.collect()

        worker.call(drop, self.bound())

    @rule(index=st.integers(0, 4), timeout=st.sampled_from([0.0, 0.05, 0.2]))
    def close_all_pools(self, index: int, timeout: float) -> None:
        """From one of the loops; it returns within its timeout, whatever the others do."""
        worker = self.worker(index)

        async def close_all() -> float:
            loop = asyncio.get_running_loop()
            started = loop.time()
            await GlobalNeo4jConnectionPool().close_all_pools(timeout)
            return loop.time() - started

        took = worker.call(close_all, self.bound(timeout + SLACK))
        assert took <= timeout + SLACK, f"close_all_pools({timeout}) took {took:.2f} s"
        self.helpers_finish(timeout)

    @rule(timeout=st.sampled_from([0.05, 0.5]))
    def close_all_loops(self, timeout: float) -> None:
        started = time.monotonic()
        close_all_loops(timeout)
        took = time.monotonic() - started
        assert took <= timeout + SLACK, f"close_all_loops({timeout}) took {took:.2f} s"
        self.helpers_finish(timeout)

    @precondition(lambda self: len(self.dead) < 4)
    @rule(index=st.integers(0, 4))
    def a_thread_ends_without_closing_its_loop(self, index: int) -> None:
        """The thread is replaced by a new one of its kind; its loop can never run again."""
        position = index % len(self.workers)
        worker = self.workers[position]
        bound = self.bound(self.max_close_timeout + SLACK)  # the runner closes its loop
        worker.end(bound, close_loop=False)
        for rec in worker.borrows:
            rec.lease = None  # whatever it held is gone with it
        worker.borrows.clear()
        self.dead.append(worker)
        self.workers[position] = Worker(self, worker.kind, len(self.workers) + len(self.dead))

    @precondition(lambda self: len(self.dead) < 6)
    @rule(index=st.integers(0, 4))
    def a_new_thread_ends_while_its_driver_opens(self, index: int) -> None:
        """A new thread borrows, and ends (its loop left) before the driver has opened.

        Fake drivers hang in ``verify_connectivity``, so the open is under way for sure;
        the real driver is mid-handshake or just done.
        """
        kinds = sorted({w.kind for w in self.workers} - {"runner"})
        kind = kinds[index % len(kinds)]
        newcomer = Worker(self, kind, len(self.workers) + len(self.dead))
        self.dead.append(newcomer)
        self.fake_factory.verify_hangs = self.fake
        try:
            self.numbers += 1
            rec = Borrow(self.numbers, LONG)
            made = self.drivers_made()

            async def start() -> None:
                newcomer.borrows.append(rec)
                rec.task = asyncio.ensure_future(newcomer.borrower(rec))
                opening = await eventually_async(lambda: self.drivers_made() > made, SLACK)
                assert opening, "the new thread's borrow did not start opening a driver"

            newcomer.call(start, self.bound(SLACK), settled=False)
        finally:
            self.fake_factory.verify_hangs = False
            newcomer.end(self.bound(), close_loop=False)
            rec.lease = None
            newcomer.borrows.clear()

    @rule(
        max_size=st.integers(1, 3),
        min_size=st.integers(0, 1),
        close_timeout=st.sampled_from([0.05, 0.1]),
        hang=st.booleans(),
    )
    def set_config(self, max_size: int, min_size: int, close_timeout: float, hang: bool) -> None:
        """A new config for the pools made from now on (and fake drivers' closes may hang)."""
        self._configure(max_size, min_size, close_timeout)
        factory = self.fake_factory
        factory.close_hangs = hang and self.fake
        for driver in list(factory.drivers):
            driver.close_hangs = factory.close_hangs

    # -- helpers ----------------------------------------------------------------------
    def helpers_finish(self, timeout: float) -> None:
        """Threads neopool started to close an idle runner loop end within their bound."""
        deadline = time.monotonic() + timeout + SLACK
        for thread in threading.enumerate():
            if thread.name == "neopool-close":
                thread.join(max(0.0, deadline - time.monotonic()))
                assert not thread.is_alive(), "a neopool-close thread outlived its bound"

    def forget_leases_of_closed_runner_loops(self) -> None:
        for worker in self.workers:
            if worker.kind != "runner":
                continue
            for rec in worker.borrows:
                loop = rec.pool.loop if rec.pool is not None else None
                if rec.state == "holding" and loop is not None and loop.is_closed():
                    rec.lease = None  # closed by close_all_loops: nothing to return it to
                    rec.state = "dropped"

    def pools_of(self, loop: asyncio.AbstractEventLoop) -> list[EventLoopConnectionPool]:
        seen: dict[int, EventLoopConnectionPool] = {}
        for pool in list(self.pools_seen):
            if pool.loop is loop:
                seen[id(pool)] = pool
        return list(seen.values())

    def drivers_made(self) -> int:
        return len(self.fake_factory.drivers) if self.fake else len(self.real_drivers)

    def drivers_of(self, loop: asyncio.AbstractEventLoop) -> list[Any]:
        if self.fake:
            return [d for d in list(self.fake_factory.drivers) if d.loop is loop]
        return [d for d, made_on in list(self.real_drivers) if made_on is loop]

    def driver_holds_nothing(self, driver: Any) -> bool:
        if isinstance(driver, FakeDriver):  # every socket it opened, taken out of it or not
            return driver.open_sockets() == 0
        return driver_socket_count(driver) == 0

    def check_books_of(self, worker: Worker) -> None:
        """On the worker's loop (or while it is idle): the pools' counts match the borrowers."""
        for loop in worker.loops:
            for pool in self.pools_of(loop):
                books(pool)
                holders = sum(b.state == "holding" and b.pool is pool for b in worker.borrows)
                assert pool.in_use == holders, f"{pool!r}: {holders} borrowers hold a lease"
                if pool.state is PoolState.OPEN:
                    waiting = sum(b.state == "waiting" and b.pool is pool for b in worker.borrows)
                    assert pool.waiting <= waiting, f"{pool!r}: {waiting} borrowers wait"
                    if pool.waiting:
                        assert pool.in_use == pool.max_size, f"{pool!r} has waiters and room"

    # -- invariants ---------------------------------------------------------------------
    @invariant()
    def nothing_escaped_a_finalizer_or_a_thread(self) -> None:
        assert not self.problems, f"exceptions escaped: {self.problems}"

    @invariant()
    def no_borrower_saw_an_unexpected_error(self) -> None:
        for worker in self.workers:
            errors = [b.error for b in worker.borrows if b.state == "error"]
            assert not errors, f"{worker.name}: {errors}"

    @invariant()
    def every_lending_pool_keeps_its_books(self) -> None:
        self.forget_leases_of_closed_runner_loops()
        live_loops = {id(loop) for w in self.workers for loop in w.loops if not loop.is_closed()}
        for pool in GlobalNeo4jConnectionPool().pools():
            assert pool.loop is not None
            assert id(pool.loop) in live_loops, f"{pool!r} lends on a loop no live thread owns"
        for worker in self.workers:
            if worker.kind == "running":

                async def check(worker: Worker = worker) -> None:
                    await settle()
                    self.check_books_of(worker)

                worker.call(check, self.bound())
            else:  # idle between commands: read from here
                self.check_books_of(worker)

    @invariant()
    def a_loop_that_can_never_run_again_holds_no_socket(self) -> None:
        GlobalNeo4jConnectionPool().sweep()
        dead_loops = [loop for worker in self.dead for loop in worker.loops]
        dead_loops += [loop for worker in self.workers for loop in worker.loops if loop.is_closed()]
        for loop in dead_loops:
            for pool in self.pools_of(loop):
                assert pool.state is PoolState.CLOSED, f"{pool!r} of a dead loop"
            for driver in self.drivers_of(loop):
                assert self.driver_holds_nothing(driver), f"{driver!r} of a dead loop"

    @invariant()
    def no_driver_was_used_from_another_loop(self) -> None:
        for driver in list(self.fake_factory.drivers):
            assert driver.wrong_loop_calls == []

    # -- the end of each example --------------------------------------------------------
    def teardown(self) -> None:
        try:
            self._end_everything()
        finally:
            for worker in [*self.workers, *self.dead]:
                if worker.alive:  # an assertion above stopped the orderly end
                    worker.end(SLACK, close_loop=True)
            self.fake_factory.unblock_all()
            GlobalNeo4jConnectionPool.set_driver_factory()
            reset_registry()
        # Whatever this example left (tasks of dead loops, the leases they were handed)
        # is collected now, so anything its finalizers raise is charged to this example.
        self.workers, self.dead, self.pools_seen, self.real_drivers = [], [], [], []
        self.fake_factory.drivers.clear()
        gc.collect()
        self.nothing_escaped_a_finalizer_or_a_thread()

    def _end_everything(self) -> None:
        bound = self.bound(self.max_close_timeout + SLACK)
        for worker in self.dead:
            assert not worker.alive, f"{worker.name} was counted dead but still runs"
        for worker in self.workers:
            if worker.kind == "runner":
                continue

            async def finish(worker: Worker = worker) -> None:
                for rec in worker.borrows:
                    if rec.state == "holding" and rec.lease is not None:
                        lease = rec.let_go("returned")
                        await GlobalNeo4jConnectionPool().return_connection(lease)
                tasks = [b.task for b in worker.borrows if b.task is not None]
                for task in tasks:
                    task.cancel()
                if tasks:
                    await asyncio.wait(tasks)
                for pool in self.pools_of(asyncio.get_running_loop()):
                    await pool.close(timeout=self.max_close_timeout)

            worker.call(finish, bound)
            worker.end(bound, close_loop=True)
        runner = next(w for w in self.workers if w.kind == "runner")

        async def give_back_all() -> None:
            for rec in runner.borrows:
                if rec.state == "holding" and rec.lease is not None:
                    lease = rec.let_go("returned")
                    await GlobalNeo4jConnectionPool().return_connection(lease)

        self.forget_leases_of_closed_runner_loops()
        runner.call(give_back_all, bound)
        runner.end(bound, close_loop=True)
        self.dead.extend(self.workers)
        self.workers = []
        started = time.monotonic()
        close_all_loops(1.0)
        assert time.monotonic() - started <= 1.0 + SLACK
        gc.collect()
        self.a_loop_that_can_never_run_again_holds_no_socket()
        assert GlobalNeo4jConnectionPool().pools() == []
        for pool in self.pools_seen:
            assert pool.state is PoolState.CLOSED, repr(pool)
            books(pool)
        self.no_driver_was_used_from_another_loop()
        self.nothing_escaped_a_finalizer_or_a_thread()


# -- running it ------------------------------------------------------------------------------


@pytest.fixture
def problems(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Exceptions out of finalizers, weakref callbacks and threads."""
    seen: list[Any] = []
    monkeypatch.setattr(
        sys, "unraisablehook", lambda info: seen.append(("unraisable", info.exc_value, info.object))
    )
    monkeypatch.setattr(
        threading, "excepthook", lambda args: seen.append(("thread", args.exc_value, args.thread))
    )
    LifecycleMachine.problems = seen
    gc.collect()
    gc.freeze()  # collections then scan only what the machine makes: milliseconds each
    try:
        yield seen
    finally:
        gc.unfreeze()
        GlobalNeo4jConnectionPool.set_driver_factory()
        reset_registry()
    gc.collect()
    assert not seen, f"exceptions escaped: {seen}"


@pytest.mark.slow  # 100 random lifecycles: about 20 s
def test_random_lifecycles_on_fake_drivers_keep_the_contract(problems: list[Any]) -> None:
    LifecycleMachine.fake, LifecycleMachine.target = True, None
    run_state_machine_as_test(
        LifecycleMachine,
        settings=settings(
            max_examples=100,
            stateful_step_count=30,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# A thread that ends while its driver opens leaves its own loop unclosed with the
# driver's connection attempt queued and not yet started; Python says so when that
# loop is collected. It is the program's loop, and true of any loop left like that:
# neopool releases the pool's sockets, and leaves the user's loop and tasks alone.
@pytest.mark.filterwarnings(
    "ignore:coroutine 'BaseSelectorEventLoop.sock_connect' was never awaited:RuntimeWarning"
)
def test_random_lifecycles_on_the_real_driver_keep_the_contract(
    problems: list[Any], neopool_bolt: BoltTarget
) -> None:
    LifecycleMachine.fake, LifecycleMachine.target = False, neopool_bolt
    try:
        run_state_machine_as_test(
            LifecycleMachine,
            settings=settings(
                max_examples=8,
                stateful_step_count=15,
                deadline=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        LifecycleMachine.fake, LifecycleMachine.target = True, None
