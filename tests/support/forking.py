"""What the fork tests share: a parent with a warm pool on a loop that stays open.

The parent of a Celery prefork worker holds its pools on a loop that is still
open when it forks, so the child inherits them. :func:`warm_parent_loop` builds
that parent (on the configuration the test set), :func:`query_value` is the
query both sides run. :func:`checks_in_a_forked_child` runs checks in a child.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator

from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory


async def query_value(value: int, workspace: str) -> int:
    """Borrow, prepare ``workspace``'s database, run ``RETURN $value``, give the lease back."""
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        database = await borrowed.prepare_database(workspace)
        driver = await borrowed.get_driver()
        records, _, _ = await driver.execute_query(
            "RETURN $value AS value", value=value, database_=database or "neo4j"
        )
        return int(records[0]["value"])


@contextlib.contextmanager
def warm_parent_loop(workspace: str) -> Iterator[asyncio.AbstractEventLoop]:
    """A loop, not running, whose pool has served a query; its pools are closed after."""
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(query_value(5, workspace)) == 5
        yield loop
        loop.run_until_complete(GlobalNeo4jConnectionPool().close_all_pools())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def checks_in_a_forked_child(checks: Callable[[], list[bool]]) -> list[bool]:
    """Fork; the child runs ``checks`` and reports each as true or false through a pipe
    (an exception there reports nothing), then exits at once; the parent returns them."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.write(write, bytes(int(ok) for ok in checks()))
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    answer = os.read(read, 64)
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    return [bool(ok) for ok in answer]
