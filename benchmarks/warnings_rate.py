"""Warning lines at sustained high utilisation: contract rule 8, "say it once".

9 borrowers keep a pool of 10 leases at >= 90% utilisation (warning threshold
0.8) against the real server: borrow, one query, return, again. Each return
dips below the threshold for a moment and the next borrow crosses it again.
Counts the warning lines neopool logs in ``--seconds`` (default 10), once with
neopool's monitor ("after") and once with a copy of the monitor before the
fix ("before"), which re-armed on every dip. Prints a line and writes
``results/warnings_rate.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

import neopool.loop_pool
import neopool.stats
from common import bolt_target, save
from neopool import GlobalNeo4jConnectionPool
from neopool.testing import busy_load, reset_registry

WORKERS = 9
MAX_SIZE = 10
THRESHOLD = 0.8

logger = logging.getLogger("neopool")


class LegacyUtilisationMonitor:
    """The monitor before the fix (one line per crossing after a dip), for the comparison."""

    def __init__(self, loop_id: str, threshold: float, max_size: int) -> None:
        self.loop_id = loop_id
        self._max_size = max_size
        self.busy_above = threshold * max_size
        self._above = False
        self._exhausted = False
        self.alerted = False

    def observe(self, in_use: int) -> None:
        above = in_use > self.busy_above
        if above and not self._above:
            logger.warning(
                "neopool: high utilisation on event loop %s: %d of %d leases in use (%.0f%%)",
                self.loop_id,
                in_use,
                self._max_size,
                100.0 * in_use / self._max_size,
            )
        self._above = above
        if in_use < self._max_size:
            self._exhausted = False
        self.alerted = self._above or self._exhausted

    def exhausted(self, waiting: int) -> None:
        if not self._exhausted:
            self._exhausted = self.alerted = True
            logger.warning(
                "neopool: pool exhausted on event loop %s: all %d leases in use, "
                "%d borrower(s) waiting; consider raising pool_max_size",
                self.loop_id,
                self._max_size,
                waiting,
            )

    def leases_lost(self, sites: Any) -> None:
        neopool.stats.report_lost_leases(self.loop_id, sites)


class Counting(logging.Handler):
    """Counts neopool's warning lines instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines = 0
        self.utilisation = 0
        self.sample = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1
        message = record.getMessage()
        if "high utilisation" in message:
            self.utilisation += 1
        self.sample = self.sample or message


async def keep_busy(seconds: float) -> dict[str, Any]:
    """WORKERS borrowers, flat out, for ``seconds``: borrows and mean sampled utilisation."""
    borrows, utilisation = await busy_load.keep_busy(WORKERS, seconds)
    return {"borrows": borrows, "mean_utilisation": round(utilisation, 3)}


def run(config: Any, seconds: float, *, legacy: bool) -> dict[str, Any]:
    counting = Counting()
    propagate, level = logger.propagate, logger.level
    logger.addHandler(counting)
    logger.propagate = False  # counted, not printed: "before" is thousands of lines
    logger.setLevel(logging.WARNING)
    monitor = neopool.loop_pool.UtilisationMonitor
    if legacy:
        neopool.loop_pool.UtilisationMonitor = LegacyUtilisationMonitor
    reset_registry()
    GlobalNeo4jConnectionPool.set_config(config)
    try:
        figures = asyncio.run(keep_busy(seconds))
    finally:
        neopool.loop_pool.UtilisationMonitor = monitor
        reset_registry()
        logger.removeHandler(counting)
        logger.propagate, logger.level = propagate, level
    return {
        **figures,
        "warning_lines": counting.lines,
        "utilisation_lines": counting.utilisation,
        "first_line": counting.sample,
    }


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    cli.add_argument("--quick", action="store_true", help="2 s runs, for a smoke test")
    cli.add_argument("--json", type=Path, default=None, help="default results/warnings_rate.json")
    options = cli.parse_args()
    seconds = 2.0 if options.quick else options.seconds
    if not hasattr(neopool.loop_pool, "UtilisationMonitor"):
        raise SystemExit("neopool.loop_pool no longer names UtilisationMonitor: cannot compare")
    with bolt_target() as target:
        config = target.config(
            pool_max_size=MAX_SIZE, pool_min_size=0, utilisation_warning=THRESHOLD
        )
        run(config, 1.0, legacy=False)  # warm up the server's query path
        runs = {
            "before": run(config, seconds, legacy=True),
            "after": run(config, seconds, legacy=False),
        }
    before, after = runs["before"], runs["after"]
    print(
        f"warning lines in {seconds:g} s at {after['mean_utilisation']:.0%} utilisation "
        f"({WORKERS} borrowers, pool of {MAX_SIZE}, threshold {THRESHOLD:g}): "
        f"before {before['warning_lines']:,} ({before['borrows']:,} borrows), "
        f"after {after['warning_lines']:,} ({after['borrows']:,} borrows)"
    )
    save(
        "warnings_rate",
        {
            "seconds": seconds,
            "workers": WORKERS,
            "max_size": MAX_SIZE,
            "threshold": THRESHOLD,
            "runs": runs,
        },
        options.json,
    )


if __name__ == "__main__":
    main()
