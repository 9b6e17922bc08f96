"""``neopool demo``: the win, measured on your machine with real servers.

The demo starts an embedded Bolt server and Valkey broker (or uses yours), a
real Celery worker, and runs the same LightRAG-style ingestion task three ways:
a new driver per task, neopool under ``asyncio.run`` per task, and neopool on
the persistent runner. It prints a table, writes JSON and a chart.

Modules: :mod:`~neopool.demo.environment` (servers, proxy, worker process),
:mod:`~neopool.demo.workload` (the task body), :mod:`~neopool.demo.app` (the
Celery app the worker imports), :mod:`~neopool.demo.modes` (submitting and
collecting), :mod:`~neopool.demo.report` and :mod:`~neopool.demo.chart`.
"""
