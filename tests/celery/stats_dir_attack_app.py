"""The test app, in a worker whose old predictable stats path a local attacker took first.

``celery -A stats_dir_attack_app worker`` imports this in the worker's main
process before ``worker_init``. With ``NEOPOOL_TEST_VICTIM`` set, it plants
``<tmp>/neopool-celery-<uid>/<this pid>`` (the directory where prefork children
used to publish their stats) as a symbolic link to that victim directory, as an
attacker who guessed the pid would. The test creates ``neopool-celery-<uid>``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from neopool.testing.celery_worker import app

__all__ = ["app"]

VICTIM_ENV = "NEOPOOL_TEST_VICTIM"

_victim = os.environ.get(VICTIM_ENV)
if _victim:
    _link = Path(tempfile.gettempdir()) / f"neopool-celery-{os.getuid()}" / str(os.getpid())
    if not _link.is_symlink():
        _link.symlink_to(_victim, target_is_directory=True)
