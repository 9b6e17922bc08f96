"""A web process: configured at startup from the same settings as the workers, closed at shutdown.

The ASGI lifespan recipe of docs/guides/web-and-workers.md, run the way an
ASGI server (uvicorn, hypercorn) runs it: the lifespan's startup, requests on
the same loop, then its shutdown. The app is plain ASGI, so the test needs no
web framework; FastAPI and Starlette pass the same lifespan to their app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionConfig, Neo4jConnectionFactory
from neopool.testing import TcpProxy
from neopool.testing.targets import reset_registry
from polling import eventually_async

pytestmark = pytest.mark.timeout(60)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@contextlib.asynccontextmanager
async def neo4j_lifespan(config: Neo4jConnectionConfig) -> AsyncIterator[None]:
    """The recipe: configure at startup, close every pool of the process at shutdown."""
    Neo4jConnectionFactory.set_config(config)
    try:
        yield
    finally:
        await Neo4jConnectionFactory.close_all_pools()


def make_app(config: Neo4jConnectionConfig) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """A plain ASGI app: the lifespan above, and one endpoint that reads the graph."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            lifespan = neo4j_lifespan(config)
            await receive()  # lifespan.startup
            await lifespan.__aenter__()
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await lifespan.__aexit__(None, None, None)
            await send({"type": "lifespan.shutdown.complete"})
            return
        records, _, _ = await Neo4jConnectionFactory.execute_query(
            "RETURN 42 AS answer", database="neo4j"
        )
        body = json.dumps({"answer": records[0]["answer"]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


class AsgiServer:
    """What an ASGI server does with an app: lifespan startup, requests, lifespan shutdown."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._lifespan: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        self._lifespan = asyncio.create_task(
            self.app({"type": "lifespan"}, self._to_app.get, self._from_app.put)
        )
        await self._to_app.put({"type": "lifespan.startup"})
        assert (await self._from_app.get())["type"] == "lifespan.startup.complete"

    async def get(self, path: str) -> tuple[int, bytes]:
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        await self.app({"type": "http", "method": "GET", "path": path}, receive, send)
        return sent[0]["status"], sent[1]["body"]

    async def shutdown(self) -> None:
        await self._to_app.put({"type": "lifespan.shutdown"})
        assert (await self._from_app.get())["type"] == "lifespan.shutdown.complete"
        assert self._lifespan is not None
        await self._lifespan


def test_the_lifespan_closes_the_driver_and_its_sockets_at_shutdown(
    worker_config: Neo4jConnectionConfig, bolt_proxy: TcpProxy
) -> None:
    reset_registry()
    app = make_app(worker_config.model_copy(update={"pool_min_size": 0}))

    async def serve() -> None:
        server = AsgiServer(app)
        await server.startup()
        results = await asyncio.gather(*(server.get("/answer") for _ in range(5)))
        assert results == [(200, b'{"answer": 42}')] * 5
        pool = await GlobalNeo4jConnectionPool().get_pool()
        assert bolt_proxy.active_connections >= 1
        await server.shutdown()
        # Still on the server's loop, before it ends: the lifespan closed it all.
        assert pool.closed
        assert await eventually_async(lambda: bolt_proxy.active_connections == 0)
        assert GlobalNeo4jConnectionPool().pools() == []

    try:
        asyncio.run(serve())
    finally:
        reset_registry()


def test_the_web_app_and_the_worker_read_the_same_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One function builds the config of every process; the environment overrides it alike."""

    def neo4j_config() -> Neo4jConnectionConfig:  # the application's settings module
        return Neo4jConnectionConfig.from_env(
            uri="bolt://graph.internal:7687", pool_max_size=20, database_fallback=False
        )

    monkeypatch.setenv("NEOPOOL_POOL_MAX_SIZE", "8")
    web, worker = neo4j_config(), neo4j_config()
    assert web == worker
    assert (web.uri, web.pool_max_size, web.database_fallback) == (
        "bolt://graph.internal:7687",
        8,
        False,
    )
