"""ArcadeDB's Bolt server as a child process, from the ``arcadedb-embedded`` wheel."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from neopool._service import Service
from neopool.config import Neo4jConnectionConfig
from neopool.embedded._ports import free_port, port_open, wait_for_port
from neopool.errors import NeopoolError

ROOT_USER = "root"


class EmbeddedServerError(NeopoolError):
    """An embedded server could not be found, started or reached."""


def arcadedb_home() -> Path:
    """The installed ``arcadedb_embedded`` package folder (jars and JRE)."""
    try:
        import arcadedb_embedded
    except ImportError:
        raise EmbeddedServerError(
            "the embedded Bolt server needs the 'arcadedb-embedded' package: "
            "pip install 'neopool[embedded]'"
        ) from None
    return Path(arcadedb_embedded.__file__).parent


class BoltServer(Service):
    """An ArcadeDB server speaking Bolt on 127.0.0.1, with database ``neo4j``.

    >>> with BoltServer() as server:          # doctest: +SKIP
    ...     config = server.config(pool_max_size=4)

    The root password is random unless given; it never appears in ``repr``.
    ``stop()`` then ``start()`` restarts on the same ports and data (for fault
    tests); leaving the ``with`` block removes everything.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        bolt_port: int | None = None,
        http_port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        database: str = "neo4j",
        startup_timeout: float = 90.0,
        java_options: tuple[str, ...] = ("-Xms64m", "-Xmx1g", "-XX:+UseSerialGC"),
    ) -> None:
        self.username = ROOT_USER
        self._password = password or secrets.token_urlsafe(16)
        self.bolt_port = bolt_port or free_port()
        self.http_port = http_port or free_port()
        self.database = database
        self.startup_timeout = startup_timeout
        self.java_options = java_options
        self._own_dir = data_dir is None
        self.root = (
            Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="neopool-arcadedb-"))
        )
        self.log_path = self.root / "server.log"
        self._process: subprocess.Popen[bytes] | None = None

    # -- addresses ---------------------------------------------------------------
    @property
    def password(self) -> str:
        """The root password (kept out of ``repr``)."""
        return self._password

    @property
    def uri(self) -> str:
        """``bolt://127.0.0.1:<port>``."""
        return f"bolt://127.0.0.1:{self.bolt_port}"

    @property
    def routing_uri(self) -> str:
        """``neo4j://127.0.0.1:<port>``, for the routing driver."""
        return f"neo4j://127.0.0.1:{self.bolt_port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process else None

    def config(self, *, routing: bool = False, **settings: Any) -> Neo4jConnectionConfig:
        """A :class:`Neo4jConnectionConfig` for this server (plus ``settings``)."""
        return Neo4jConnectionConfig(
            uri=self.routing_uri if routing else self.uri,
            username=self.username,
            password=self.password,
            **settings,
        )

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<BoltServer {self.uri} {state}>"

    # -- lifecycle -----------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> BoltServer:
        """Start the server and wait until Bolt answers and the database exists."""
        if self.running:
            return self
        home = arcadedb_home()
        java = home / "jre" / "bin" / "java"
        if not java.exists():
            found = shutil.which("java")
            if found is None:
                raise EmbeddedServerError(f"no Java runtime in {home / 'jre'} nor on PATH")
            java = Path(found)
        for port in (self.bolt_port, self.http_port):
            if port_open(port):
                raise EmbeddedServerError(f"port {port} on 127.0.0.1 is already in use")
        command = [
            str(java),
            *self.java_options,
            "-cp",
            str(home / "jars" / "*"),
            "-Darcadedb.server.plugins=Bolt:com.arcadedb.bolt.BoltProtocolPlugin",
            "-Darcadedb.bolt.host=127.0.0.1",
            f"-Darcadedb.bolt.port={self.bolt_port}",
            "-Darcadedb.server.httpIncomingHost=127.0.0.1",
            f"-Darcadedb.server.httpIncomingPort={self.http_port}",
            f"-Darcadedb.server.rootPath={self.root}",
            f"-Darcadedb.server.databaseDirectory={self.root / 'databases'}",
            "-Darcadedb.server.mode=development",
            f"-Darcadedb.server.rootPassword={self._password}",
            "com.arcadedb.server.ArcadeDBServer",
        ]
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not the JVM
            )
        try:
            self._wait_ready()
            self._ensure_database()
            self._wait_for_bolt()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise EmbeddedServerError(
                    f"the ArcadeDB server exited during start-up; its log says:\n{self.log_tail()}"
                )
            if port_open(self.http_port) and port_open(self.bolt_port):
                return
            time.sleep(0.1)
        raise EmbeddedServerError(
            f"the ArcadeDB server did not open its ports within {self.startup_timeout:g}s; "
            f"its log says:\n{self.log_tail()}"
        )

    def _wait_for_bolt(self) -> None:
        """Wait until a Bolt client can log in and query: the port opens seconds earlier."""
        from neo4j import GraphDatabase
        from neo4j.exceptions import Neo4jError, ServiceUnavailable

        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        with GraphDatabase.driver(
            self.uri, auth=(self.username, self._password), connection_timeout=5
        ) as driver:
            while time.monotonic() < deadline:
                if not self.running:
                    break
                try:
                    driver.execute_query("RETURN 1", database_=self.database)
                    return
                except (Neo4jError, ServiceUnavailable, OSError) as exc:
                    last = exc
                    time.sleep(0.1)
        raise EmbeddedServerError(
            f"the ArcadeDB server did not answer Bolt queries within "
            f"{self.startup_timeout:g}s ({type(last).__name__}); its log says:\n{self.log_tail()}"
        )

    def _ensure_database(self) -> None:
        existing = self._http("GET", "/api/v1/databases").get("result", [])
        if self.database not in existing:
            self.command(f"create database {self.database}")

    def command(self, command: str) -> dict[str, Any]:
        """Run a server command over HTTP (``create database x``, ...)."""
        return self._http("POST", "/api/v1/server", {"command": command})

    def _http(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        token = base64.b64encode(f"{self.username}:{self._password}".encode()).decode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise EmbeddedServerError(
                f"ArcadeDB {method} {path} failed: {exc.code} {detail}"
            ) from None
        except OSError as exc:
            raise EmbeddedServerError(f"ArcadeDB {method} {path} failed: {exc}") from None
        result: dict[str, Any] = json.loads(payload) if payload else {}
        return result

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (data is kept until :meth:`cleanup`)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        wait_for_closed = time.monotonic() + 5
        while time.monotonic() < wait_for_closed and port_open(self.bolt_port):
            time.sleep(0.05)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop, then start again on the same ports with the same data."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the server and delete its data folder (if it made one)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    end = cleanup

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def wait_until_accepting(server: BoltServer, timeout: float = 30.0) -> bool:
    """Whether the server's Bolt port accepts connections within ``timeout``."""
    return wait_for_port(server.bolt_port, time.monotonic() + timeout)
