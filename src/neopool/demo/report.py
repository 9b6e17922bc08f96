"""Figures and their presentation: percentiles, machine description, tables, JSON."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

#: Where results go unless told otherwise (gitignored).
RESULTS_DIR = Path("results")


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile by linear interpolation (0.0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise_ms(values: Sequence[float]) -> dict[str, float]:
    """Mean, p50, p95 and p99 of millisecond figures, rounded for humans."""
    mean = sum(values) / len(values) if values else 0.0
    return {
        "mean_ms": round(mean, 3),
        "p50_ms": round(percentile(values, 0.50), 3),
        "p95_ms": round(percentile(values, 0.95), 3),
        "p99_ms": round(percentile(values, 0.99), 3),
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: enough to compare two runs honestly."""
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load,
        "neo4j_driver": _version("neo4j"),
        "neo4j_rust_ext": _version("neo4j-rust-ext"),
        "celery": _version("celery"),
        "neopool": _version("neopool"),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as indented JSON, creating the folder; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return target


def format_cell(value: Any) -> str:
    """Numbers with sensible precision, ``None`` as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"
    return str(value)


#: Columns of a per-mode results table (demo and macro benchmark alike).
MODE_COLUMNS = ["mode", "tasks/s", "p50 ms", "p95 ms", "p99 ms", "Bolt conns", "drivers", "errors"]


def mode_rows(modes: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    """One row per mode of a results ``{"modes": ...}`` mapping, in MODE_COLUMNS order."""
    keys = ("tasks_per_s", "p50_ms", "p95_ms", "p99_ms", "connections_opened")
    return [
        [name, *(m[k] for k in keys), m["drivers_created"], m["errors"]]
        for name, m in modes.items()
    ]


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    caption: str | None = None,
) -> None:
    """A rich table on the terminal (plain text when output is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # files and pipes: wide enough for every column
    table = Table(title=title, caption=caption, title_justify="left")
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*(format_cell(cell) for cell in row))
    console.print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table as GitHub Markdown, for the README."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(format_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
