"""``celery -A neopool.testing.lightrag_worker worker``: LightRAG ingestion tasks.

The app of :func:`neopool.testing.lightrag_app.make_lightrag_app`, built from the
environment: the broker from ``NEOPOOL_CELERY_BROKER_URL``, the queue from
``NEOPOOL_CELERY_QUEUE``, the server from ``NEO4J_*``, LightRAG's files under
``NEOPOOL_LIGHTRAG_DIR`` (a folder per worker process).
"""

from __future__ import annotations

import os

from neopool.testing.celery_app import BROKER_ENV, DEFAULT_QUEUE, QUEUE_ENV
from neopool.testing.lightrag_app import make_lightrag_app

app = make_lightrag_app(os.environ[BROKER_ENV], queue=os.environ.get(QUEUE_ENV, DEFAULT_QUEUE))

# Imported here, before the pool forks, so that no child imports LightRAG on its first task.
import neopool.integrations.lightrag  # noqa: E402, F401
