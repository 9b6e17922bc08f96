"""Celery integration: reuse connections across tasks, close them at shutdown.

>>> app = Celery("proj", broker=...)                      # doctest: +SKIP
>>> neopool.celery.setup(app, Neo4jConnectionConfig(...))  # doctest: +SKIP
>>> @app.task(base=AsyncTask)                             # doctest: +SKIP
... async def ingest(doc_id): ...

``setup`` wires the worker lifecycle (:mod:`neopool.celery.lifecycle`),
:class:`AsyncTask` runs ``async def`` tasks on the worker thread's persistent
loop (:mod:`neopool.celery.task`), and :func:`cluster_stats` /
``celery inspect neopool_stats`` report every pool in the cluster, and
:func:`cluster_totals` / ``celery inspect neopool_totals`` what every process
has done since it started (:mod:`neopool.celery.stats`, which explains how
prefork children publish).
"""

from neopool.celery.lifecycle import UnsupportedPool, setup
from neopool.celery.stats import (
    ClusterStats,
    ClusterTotals,
    ProcessStats,
    cluster_stats,
    cluster_totals,
)
from neopool.celery.task import AsyncTask

__all__ = [
    "AsyncTask",
    "ClusterStats",
    "ClusterTotals",
    "ProcessStats",
    "UnsupportedPool",
    "cluster_stats",
    "cluster_totals",
    "setup",
]
