"""Credential rotation: a provider, one driver auth manager per loop, a real server.

The password of a real server user is changed while borrowers on several
event loops run queries (ArcadeDB's HTTP server API: drop the user, create it
again with a new password); then the secrets store the provider reads starts
returning the new password. The rotation must be picked up without restarting
anything; the time it takes is measured and printed.

What ArcadeDB does, and this suite relies on (checked below):

* A dropped user's open connections do not keep working: every request
  re-checks the credentials, so the next request fails with
  ``Neo.ClientError.Security.Unauthorized`` ("The credentials of this
  connection are no longer valid"), the driver's ``AuthError``, which reaches
  the driver's auth manager. (Neo4j checks at logon only.)
* After that failure it leaves the connection expecting a LOGON, so the
  driver's re-login of that pooled connection (LOGOFF, LOGON) fails once with
  ``ClientError`` ("LOGOFF not expected in state: AUTHENTICATION") and the
  driver drops it; Neo4j accepts the LOGOFF. Borrowers see that once per pooled
  connection during a rotation.
* Five failed logons of a user lock it out for about 30 s, even with the right
  password (Neo4j: 3 failures, 5 s). So the manager must not try a rejected
  password again while the store still hands it out, and the drill rotates a
  steady state (every socket open), as a running service would.

What the driver does not do, and neopool's manager adds, is shown against the
driver's own ``AsyncAuthManagers.basic``: a logon refused on a *new* connection
never reaches the driver's manager.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from neo4j import AsyncGraphDatabase, Auth, basic_auth
from neo4j.auth_management import AsyncAuthManagers, ExpiringAuth
from neo4j.exceptions import AuthError, ClientError, DriverError, Neo4jError

from neopool import (
    EventLoopConnectionPool,
    GlobalNeo4jConnectionPool,
    Neo4jConnectionFactory,
    PoolStats,
    credentials,
)
from neopool.credentials import _as_expiring_auth as as_expiring_auth
from neopool.credentials import _start_call, auth_manager
from neopool.embedded import BoltServer
from neopool.testing import BoltTarget, TcpProxy, reset_registry
from user_code import query_on

pytestmark = pytest.mark.timeout(120)

LOOPS = 3
BORROWERS = 4
#: Queries each loop runs before the rotation, so it rotates a steady state.
WARM_QUERIES = 50
#: Far beyond what a rotation takes: reaching it means it was never picked up.
DEADLINE_S = 30.0


# -- providers, without a server ---------------------------------------------------------------
def test_every_credential_form_becomes_an_expiring_auth() -> None:
    assert as_expiring_auth(("alice", "pw")) == ExpiringAuth(("alice", "pw"))
    auth = basic_auth("alice", "pw")
    assert as_expiring_auth(auth).auth is auth
    expiring = ExpiringAuth(auth).expires_in(60)
    assert as_expiring_auth(expiring) is expiring


@pytest.mark.parametrize(
    ("result", "shape"),
    [
        ("alice:topsecret", "returned str"),
        (("alice", None), "a tuple of 2 (str, NoneType)"),
        (("alice", "topsecret", "extra"), "a tuple of 3"),
        (None, "returned NoneType"),
        (ExpiringAuth({"user": "topsecret"}), "returned dict as ExpiringAuth.auth"),  # type: ignore[arg-type]
    ],
)
def test_a_provider_result_of_the_wrong_kind_is_a_type_error_that_shows_no_value(
    result: object, shape: str
) -> None:
    def provider() -> object:
        return result

    with pytest.raises(TypeError) as raised:
        as_expiring_auth(result, provider)
    message = str(raised.value)
    assert shape in message
    assert "provider" in message
    assert "a (user, password) tuple of str, a neo4j.Auth" in message
    assert "topsecret" not in message


async def test_a_plain_provider_runs_in_a_worker_thread_and_an_async_one_on_the_loop() -> None:
    loop_thread = threading.current_thread()
    seen: list[threading.Thread] = []

    def plain() -> tuple[str, str]:
        seen.append(threading.current_thread())
        time.sleep(0.05)  # a blocking call: it must not stall the loop
        return ("alice", "pw")

    async def coroutine() -> tuple[str, str]:
        seen.append(threading.current_thread())
        return ("bob", "pw")

    class Callable_:
        async def __call__(self) -> tuple[str, str]:
            seen.append(threading.current_thread())
            return ("carol", "pw")

    def returns_awaitable() -> Awaitable[tuple[str, str]]:
        return coroutine()

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    ticking = asyncio.create_task(ticker())
    assert await _start_call(plain) == ("alice", "pw")
    ticking.cancel()
    assert ticks >= 3, "the loop stalled while the plain provider blocked"
    assert seen[0] is not loop_thread

    assert await _start_call(coroutine) == ("bob", "pw")
    assert await _start_call(functools.partial(coroutine)) == ("bob", "pw")
    assert await _start_call(Callable_()) == ("carol", "pw")
    assert seen[1:4] == [loop_thread] * 3
    assert await _start_call(returns_awaitable) == ("bob", "pw")


# -- a server user whose password changes -------------------------------------------------------
@dataclass
class Account:
    """A user of the embedded server, and the secrets store its provider reads.

    :attr:`password` is what the store hands out (what :meth:`publish` sets);
    :meth:`create` gives the server user the password it is passed.
    """

    server: BoltServer
    name: str
    password: str = field(repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    fetched: list[tuple[str, float, threading.Thread, int | None]] = field(
        default_factory=list, repr=False
    )

    def create(self, password: str | None = None) -> None:
        spec = {
            "name": self.name,
            "password": password or self.password,
            "databases": {"neo4j": "admin"},
        }
        self.server.command(f"create user {json.dumps(spec)}")

    def drop(self) -> None:
        self.server.command(f"drop user {self.name}")

    def current(self) -> tuple[str, str]:
        """What a secrets store would hand out now."""
        with self.lock:
            password = self.password
        try:
            loop_id: int | None = id(asyncio.get_running_loop())
        except RuntimeError:
            loop_id = None
        self.fetched.append((password, time.perf_counter(), threading.current_thread(), loop_id))
        return (self.name, password)

    def sync_provider(self) -> tuple[str, str]:
        return self.current()

    async def async_provider(self) -> tuple[str, str]:
        await asyncio.sleep(0)
        return self.current()

    def publish(self, password: str) -> None:
        with self.lock:
            self.password = password


@pytest.fixture
def server(neopool_bolt: BoltTarget) -> BoltServer:
    if neopool_bolt.embedded is None:
        pytest.skip("changes a server user through ArcadeDB's HTTP API: needs the embedded server")
    return neopool_bolt.embedded


@pytest.fixture
def account(server: BoltServer) -> Iterator[Account]:
    account = Account(server, f"rotated_{secrets.token_hex(4)}", f"first-{secrets.token_hex(8)}")
    account.create()
    yield account
    account.drop()


def _passwords_absent(errors: list[BaseException], *passwords: str) -> bool:
    text = " ".join(f"{error!r} {error}" for error in errors)
    return not any(password in text for password in passwords)


async def test_arcadedb_rejects_the_open_connections_of_a_dropped_user(
    neopool_bolt: BoltTarget, account: Account
) -> None:
    """What the drill below relies on: an open connection does not outlive its credential."""
    driver = AsyncGraphDatabase.driver(
        neopool_bolt.uri,
        auth=(account.name, account.password),
        **neopool_bolt.config().driver_options(),
    )
    try:
        async with driver.session(database="neo4j") as session:
            await (await session.run("RETURN 1")).consume()
            account.drop()
            account.create()  # same user, same password, but a new account
            with pytest.raises(AuthError, match="no longer valid"):
                await (await session.run("RETURN 2")).consume()
    finally:
        await driver.close()


# -- rotation under load -------------------------------------------------------------------------
@dataclass
class LoopRun:
    """What one event loop's borrowers saw."""

    name: str
    successes: list[tuple[float, float]] = field(default_factory=list)  # (started, ended)
    #: (started, error) of each query that failed: ``execute_query`` retries for up to
    #: ``max_transaction_retry_time``, so one started before the rotation may fail after it.
    errors: list[tuple[float, BaseException]] = field(default_factory=list)
    stats: PoolStats | None = None
    loop_id: int | None = None


async def _borrowers(run: LoopRun, stop: threading.Event, started: threading.Event) -> None:
    run.loop_id = id(asyncio.get_running_loop())

    async def borrower(number: int) -> None:
        while not stop.is_set():
            began = time.perf_counter()
            try:
                async with Neo4jConnectionFactory.borrow_connection() as borrowed:
                    driver = await borrowed.get_driver()
                    records, _, _ = await driver.execute_query(
                        "RETURN $n AS n", n=number, database_="neo4j"
                    )
                    assert records[0]["n"] == number
            except (Neo4jError, DriverError) as exc:
                run.errors.append((began, exc))
                await asyncio.sleep(0.01)
            else:
                run.successes.append((began, time.perf_counter()))
                started.set()

    await asyncio.gather(*(borrower(n) for n in range(BORROWERS)))
    run.stats = (await GlobalNeo4jConnectionPool().get_pool()).stats()


def _story(runs: list[LoopRun], account: Account, began: float, rotated: float) -> str:
    """What the loops saw during and after the rotation, for a failure message (no passwords)."""
    seen: Counter[str] = Counter()
    for run in runs:
        for started, error in run.errors:
            if started > began:
                when = "during" if started < rotated else "after"
                seen[f"{when} {run.name}: {type(error).__name__}: {str(error)[50:110]}"] += 1
    asked = Counter(
        ("during " if at < rotated else "after ")
        + ("new" if password == account.password else "old")
        for password, at, *_ in account.fetched
        if at > began
    )
    return f"errors {dict(seen)}; provider answers {dict(asked)}"


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_password_rotated_while_borrowers_run_is_picked_up_without_a_restart(
    kind: str,
    neopool_bolt: BoltTarget,
    account: Account,
    capsys: pytest.CaptureFixture[str],
) -> None:
    provider = account.sync_provider if kind == "sync" else account.async_provider
    reset_registry()
    GlobalNeo4jConnectionPool.set_config(
        neopool_bolt.config(
            username=account.name,
            credentials=provider,
            pool_max_size=BORROWERS,
            pool_min_size=2,
            max_transaction_retry_time=5.0,
        )
    )
    old_password, new_password = account.password, f"second-{secrets.token_hex(8)}"
    runs = [LoopRun(f"loop-{n}") for n in range(LOOPS)]
    stop = threading.Event()
    going = [threading.Event() for _ in runs]
    threads = [
        threading.Thread(
            target=lambda r=run, g=gone: asyncio.run(_borrowers(r, stop, g)), name=run.name
        )
        for run, gone in zip(runs, going, strict=True)
    ]
    try:
        for thread in threads:
            thread.start()
        assert all(event.wait(DEADLINE_S) for event in going), "borrowers never got going"
        # Steady state first: every loop's driver has opened the sockets its borrowers use.
        assert _wait(lambda: all(len(run.successes) >= WARM_QUERIES for run in runs), DEADLINE_S)

        # The rotation: the server first, then the secrets store the provider reads.
        rotation_began = time.perf_counter()
        account.drop()
        account.create(new_password)
        account.publish(new_password)
        rotated = time.perf_counter()

        def recovered(run: LoopRun) -> bool:
            return any(began > rotated for began, _ in run.successes)

        assert _wait(lambda: all(recovered(run) for run in runs), DEADLINE_S), (
            f"some loop never succeeded with the new password: "
            f"{_story(runs, account, rotation_began, rotated)}"
        )
        everyone_back = time.perf_counter()
        quiet_from = time.perf_counter()
        time.sleep(1.0)  # and they keep working
    finally:
        stop.set()
        for thread in threads:
            thread.join(DEADLINE_S)
        reset_registry()

    # -- the figures -------------------------------------------------------------------------
    first_ok = {
        run.name: min(ended for began, ended in run.successes if began > rotated) - rotated
        for run in runs
    }
    after = [entry for entry in account.fetched if entry[1] > rotation_began]
    errors = [error for run in runs for _, error in run.errors]
    with capsys.disabled():
        print(
            f"\n    credential rotation ({kind} provider, {LOOPS} loops x {BORROWERS} "
            f"borrowers{', over TLS' if neopool_bolt.tls else ''}): first query with the new "
            f"password {min(first_ok.values()) * 1000:.0f} ms after the provider returned it "
            f"(every loop: {(everyone_back - rotated) * 1000:.0f} ms; per loop "
            f"{', '.join(f'{v * 1000:.0f}' for v in first_ok.values())} ms; from the start "
            f"of the rotation {(min(first_ok.values()) + rotated - rotation_began) * 1000:.0f} "
            f"ms); {len(errors)} failed queries during it "
            f"({', '.join(sorted({type(e).__name__ for e in errors})) or 'none'}); the "
            f"provider was called {len(after)} times"
        )

    # -- what must hold ----------------------------------------------------------------------
    for run in runs:
        assert run.stats is not None
        assert run.stats["drivers_created"] == 1, "the rotation happened inside the driver"
        assert (run.stats["in_use"], run.stats["waiting"]) == (0, 0), "no lease lost"
        late = [error for started, error in run.errors if started > quiet_from]
        assert not late, f"{run.name} still failed after it had recovered: {late!r}"
    for error in errors:
        rejected = isinstance(error, AuthError)
        arcadedb_relogin = (
            isinstance(error, ClientError)
            and error.code == "Neo.ClientError.Request.Invalid"
            and "not expected in state: AUTHENTICATION" in str(error)
        )
        assert rejected or arcadedb_relogin, f"unexpected error during the rotation: {error!r}"
    assert _passwords_absent(errors, old_password, new_password)
    failed_logons = [e for e in errors if isinstance(e, AuthError) and "failed" in str(e)]
    assert not failed_logons, "a rejected password was tried again (servers lock users out)"
    # The provider was asked again after the rotation, by the manager of every loop's driver.
    assert any(password == new_password for password, *_ in after)
    loop_ids = {run.loop_id for run in runs}
    threads_used = {thread for *_, thread, _ in after}
    if kind == "sync":  # in worker threads, never on a loop's own thread
        assert not threads_used & set(threads)
    else:  # on each loop, which each has a manager of its own
        assert loop_ids <= {loop_id for *_, loop_id in after}


# -- rejection and expiry --------------------------------------------------------------------------
async def _query(driver: Any) -> None:
    await driver.execute_query("RETURN 1", database_="neo4j")


async def test_a_logon_refused_on_a_new_connection_makes_neopool_ask_again(
    neopool_bolt: BoltTarget, account: Account, neopool_proxy: TcpProxy
) -> None:
    """The driver's own manager never hears of it; neopool's does, through the borrower."""
    old, new = account.password, f"second-{secrets.token_hex(8)}"

    def rotate() -> None:  # with no connection open, so no open connection reports it
        assert neopool_proxy.cut_all() >= 1
        account.drop()
        account.create(new)
        account.publish(new)

    # The driver's basic manager keeps the password it cached, however often it is refused.
    driver = AsyncGraphDatabase.driver(
        neopool_proxy.uri(),
        auth=AsyncAuthManagers.basic(account.async_provider),
        max_transaction_retry_time=0.0,
        liveness_check_timeout=0.0,  # a socket cut by the proxy is found before use
    )
    try:
        await _query(driver)
        rotate()
        for _ in range(2):
            with pytest.raises(AuthError, match="failed"):
                await _query(driver)
        assert [password for password, *_ in account.fetched].count(new) == 0
    finally:
        await driver.close()
    account.drop()
    account.create(old)
    account.publish(old)
    account.fetched.clear()

    # neopool's: the borrower leaves with the AuthError, and the next logon asks again.
    pool = EventLoopConnectionPool(
        neopool_bolt.config(
            uri=neopool_proxy.uri(),
            username=account.name,
            credentials=account.async_provider,
            max_transaction_retry_time=0.0,
            liveness_check_timeout=0.0,
        ),
        "new-logon",
    )
    try:
        async with _borrowed(pool) as borrowed:
            await _query(borrowed)
        rotate()
        with pytest.raises(AuthError, match="failed"):
            async with _borrowed(pool) as borrowed:
                await _query(borrowed)
        async with _borrowed(pool) as borrowed:
            await _query(borrowed)  # the next logon used the new password
        assert [password for password, *_ in account.fetched] == [old, new]
        assert pool.stats()["drivers_created"] == 1
    finally:
        await pool.close()


async def test_a_logon_refused_to_a_nested_session_makes_neopool_ask_again(
    configure: Callable[..., Any], account: Account, neopool_proxy: TcpProxy
) -> None:
    """The nested session meets the refusal and the borrow around it then ends cleanly: the lease
    goes back with the AuthError all the same, and the next logon asks the provider again."""
    configure(
        uri=neopool_proxy.uri(),
        username=account.name,
        credentials=account.async_provider,
        max_transaction_retry_time=0.0,
        liveness_check_timeout=0.0,  # a socket cut by the proxy is found before use
        pool_max_size=1,
        pool_min_size=0,
    )
    new = f"second-{secrets.token_hex(8)}"

    async def a_query() -> None:
        async with Neo4jConnectionFactory.session(database="neo4j") as session:
            await (await session.run("RETURN 1")).consume()

    async with Neo4jConnectionFactory.borrow_connection():
        await a_query()
        assert neopool_proxy.cut_all() >= 1  # no connection open, so none reports it
        account.drop()
        account.create(new)
        account.publish(new)
        with pytest.raises(AuthError, match="failed"):
            await a_query()
    await a_query()  # the next logon used the new password
    assert [password for password, *_ in account.fetched][-1] == new


class _borrowed:
    """``async with`` one lease of ``pool``, returned with the error it ended with."""

    def __init__(self, pool: EventLoopConnectionPool) -> None:
        self.pool = pool

    async def __aenter__(self) -> Any:
        self.lease = await self.pool.borrow()
        return await self.lease.get_driver()

    async def __aexit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        await self.pool.return_connection(self.lease, error)


async def test_a_rejected_password_is_not_tried_again_while_the_store_still_has_it(
    neopool_bolt: BoltTarget, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(credentials, "_REJECTED_GRACE_S", 0.4)
    manager = auth_manager(account.async_provider)
    assert await manager.get_auth() == (account.name, account.password)
    refused = await _refused_logon(neopool_bolt)  # a real one, from the server
    assert await manager.handle_security_exception((account.name, account.password), refused)
    assert len(account.fetched) == 2  # asked again at once: still the old one

    # The store catches up 0.15 s later: the manager waits for it instead of failing logons.
    new = f"second-{secrets.token_hex(8)}"
    asyncio.get_running_loop().call_later(0.15, account.publish, new)
    started = time.monotonic()
    assert await manager.get_auth() == (account.name, new)
    assert 0.1 < time.monotonic() - started < 1.0

    # A store that never changes: after the grace, the server gets to decide again.
    assert await manager.handle_security_exception((account.name, new), refused)
    started = time.monotonic()
    assert await manager.get_auth() == (account.name, new)
    assert 0.35 < time.monotonic() - started < 1.5
    assert await manager.get_auth() == (account.name, new)  # and no more waiting after it


async def _refused_logon(target: BoltTarget) -> Neo4jError:
    driver = AsyncGraphDatabase.driver(
        target.uri, auth=("nobody-here", "wrong"), **target.config().driver_options()
    )
    try:
        await driver.verify_connectivity()
    except AuthError as exc:
        return exc
    finally:
        await driver.close()
    raise AssertionError("the server accepted a user that does not exist")


async def test_a_rejected_credential_is_the_drivers_auth_error_and_a_later_borrow_asks_again(
    neopool_bolt: BoltTarget, account: Account
) -> None:
    right = account.password
    account.publish("wrong-password-xyz")
    pool = EventLoopConnectionPool(
        neopool_bolt.config(username=account.name, credentials=account.async_provider), "rejected"
    )
    try:
        with pytest.raises(AuthError) as rejected:
            await pool.borrow()
        assert _passwords_absent([rejected.value], "wrong-password-xyz", right)
        account.publish(right)
        lease = await pool.borrow()  # the provider is asked again, and now it is right
        driver = await lease.get_driver()
        records, _, _ = await driver.execute_query("RETURN 1 AS one", database_="neo4j")
        assert records[0]["one"] == 1
        await pool.return_connection(lease)
        assert [password for password, *_ in account.fetched][-1] == right
    finally:
        await pool.close()


async def test_an_expiring_credential_is_fetched_again_once_it_has_expired(
    neopool_bolt: BoltTarget, account: Account
) -> None:
    calls: list[float] = []

    async def token() -> ExpiringAuth:
        calls.append(time.monotonic())
        return ExpiringAuth(Auth("basic", account.name, account.password)).expires_in(0.5)

    pool = EventLoopConnectionPool(
        neopool_bolt.config(username=account.name, credentials=token, pool_min_size=1), "expiring"
    )

    try:
        await query_on(pool)
        await query_on(pool)
        assert len(calls) == 1  # cached while it is valid
        await asyncio.sleep(0.6)
        await query_on(pool)
        assert len(calls) == 2  # expired: fetched again before the next use
        assert pool.stats()["drivers_created"] == 1
    finally:
        await pool.close()


async def test_a_provider_that_returns_nonsense_fails_the_borrow_with_a_clear_type_error(
    neopool_bolt: BoltTarget,
) -> None:
    def provider() -> Any:
        return "neo4j:topsecret"

    pool = EventLoopConnectionPool(neopool_bolt.config(credentials=provider), "nonsense")
    try:
        with pytest.raises(TypeError, match="returned str") as raised:
            await pool.borrow()
        assert "topsecret" not in str(raised.value)
    finally:
        await pool.close()
