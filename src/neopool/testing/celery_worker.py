"""``celery -A neopool.testing.celery_worker worker``: the test app, from the environment.

Reads the broker from ``NEOPOOL_CELERY_BROKER_URL``, the queue from
``NEOPOOL_CELERY_QUEUE`` and the server from ``NEO4J_*``.
"""

from __future__ import annotations

import os

from neopool.testing.celery_app import BROKER_ENV, DEFAULT_QUEUE, QUEUE_ENV, make_app

app = make_app(os.environ[BROKER_ENV], queue=os.environ.get(QUEUE_ENV, DEFAULT_QUEUE))
