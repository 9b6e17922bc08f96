"""A credentials provider that stops answering: logons fail within their bound, exit never waits.

The provider's first credential expires after 1 s and its second call blocks.
With ``connection_acquisition_timeout=2`` the next query must fail within
about 2 s with :class:`CredentialsTimeout` (naming the provider and the bound),
a query that comes while the call still hangs must wait for that same call
(no second thread), and a process whose provider hangs must exit at once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
from neo4j import basic_auth
from neo4j.auth_management import ExpiringAuth

from neopool import CredentialsTimeout, EventLoopConnectionPool
from neopool.testing import BoltTarget
from user_code import query_on

pytestmark = pytest.mark.timeout(60)

BOUND_S = 2.0
#: What a failure "within the bound" may take beyond it on a loaded machine.
SLACK_S = 2.0


class HangingProvider:
    """Answers once with a credential that expires after 1 s; blocks every later call."""

    def __init__(self, target: BoltTarget) -> None:
        self.target = target
        self.calls = 0
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []

    def __call__(self) -> ExpiringAuth:
        self.calls += 1
        self.threads.append(threading.current_thread())
        if self.calls > 1:
            self.release.wait()
        auth = basic_auth(self.target.username, self.target.password)
        return ExpiringAuth(auth).expires_in(1 if self.calls == 1 else 3600)


def _config(target: BoltTarget, provider: Any) -> Any:
    return target.config(
        credentials=provider,
        connection_timeout=BOUND_S,
        connection_acquisition_timeout=BOUND_S,
        borrow_timeout=BOUND_S,
        max_transaction_retry_time=0.0,
        pool_min_size=1,
    )


@pytest.mark.timing
async def test_a_query_fails_within_the_acquisition_timeout_when_the_provider_hangs(
    neopool_bolt: BoltTarget,
) -> None:
    provider = HangingProvider(neopool_bolt)
    pool = EventLoopConnectionPool(_config(neopool_bolt, provider), "hung-provider")

    try:
        await query_on(pool)
        await asyncio.sleep(1.1)  # the first credential has expired
        for _ in range(2):  # the second waits for the same call: it is still on its way
            started = time.monotonic()
            with pytest.raises(CredentialsTimeout) as raised:
                await asyncio.wait_for(query_on(pool), 60)
            elapsed = time.monotonic() - started
            assert BOUND_S - 0.2 <= elapsed < BOUND_S + SLACK_S, elapsed
        message = str(raised.value)
        assert "HangingProvider" in message
        assert "2s" in message
        assert "connection_acquisition_timeout" in message
        assert neopool_bolt.password not in message
        assert provider.calls == 2, "a logon started a second call while one was hanging"
        hung = provider.threads[1]
        assert hung.daemon
        assert hung is not threading.current_thread()

        provider.release.set()  # the provider answers again: logons work again
        assert await _eventually_succeeds(pool)
        assert pool.stats()["drivers_created"] == 1
    finally:
        provider.release.set()
        await pool.close()


async def _eventually_succeeds(pool: EventLoopConnectionPool, attempts: int = 5) -> bool:
    for _ in range(attempts):
        try:
            await query_on(pool)
        except CredentialsTimeout:
            continue
        return True
    return False


_CHILD = textwrap.dedent(
    """
    import asyncio, os, sys, threading, time
    from neo4j import basic_auth
    from neo4j.auth_management import ExpiringAuth
    from neopool import CredentialsTimeout, EventLoopConnectionPool, Neo4jConnectionConfig

    calls = 0
    never = threading.Event()

    def provider():
        global calls
        calls += 1
        if calls > 1:
            never.wait()  # hangs for good
        auth = basic_auth(os.environ["T_USER"], os.environ["T_PASSWORD"])
        return ExpiringAuth(auth).expires_in(1)

    async def main():
        config = Neo4jConnectionConfig(
            uri=os.environ["T_URI"], username=os.environ["T_USER"], credentials=provider,
            connection_timeout=2, connection_acquisition_timeout=2, borrow_timeout=2,
            max_transaction_retry_time=0, pool_min_size=1,
        )
        pool = EventLoopConnectionPool(config, "child")
        lease = await pool.borrow()
        driver = await lease.get_driver()
        await driver.execute_query("RETURN 1", database_="neo4j")
        await asyncio.sleep(1.1)
        try:
            await driver.execute_query("RETURN 1", database_="neo4j")
        except CredentialsTimeout:
            print("timed out", flush=True)
        await pool.return_connection(lease)
        await pool.close(1)

    asyncio.run(main())
    print("done", flush=True)
    """
)


@pytest.mark.timing
def test_a_process_whose_provider_hangs_exits_promptly(neopool_bolt: BoltTarget) -> None:
    if neopool_bolt.tls:
        pytest.skip("the child connects without the target's TLS settings")
    env = {
        **os.environ,
        "T_URI": neopool_bolt.uri,
        "T_USER": neopool_bolt.username,
        "T_PASSWORD": neopool_bolt.password,
    }
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = child.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        pytest.fail(f"the process did not exit: its provider's thread held it\n{out}\n{err}")
    elapsed = time.monotonic() - started
    assert child.returncode == 0, err
    assert out.split() == ["timed", "out", "done"], (out, err)
    assert elapsed < 25, elapsed
