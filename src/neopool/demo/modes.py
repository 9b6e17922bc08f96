"""Running one mode: send N tasks, follow them with a progress bar, add them up."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from neopool.demo.report import summarise_ms

#: How long to wait for any one task's result before counting it as an error.
RESULT_TIMEOUT = 120.0


@dataclass
class ModeResult:
    """What one mode did: per-task durations and per-process counter deltas."""

    name: str
    tasks: int
    seconds: float = 0.0
    durations_ms: list[float] = field(default_factory=list)
    connections_opened: int = 0
    drivers_created: int = 0
    errors: int = 0
    first_error: str | None = None
    connections_by_round: list[int] = field(default_factory=list)
    #: Per worker process: its counters before its first task and after its last, so far.
    _span: dict[int, tuple[dict[str, int], dict[str, int]]] = field(
        default_factory=dict, repr=False
    )

    def count_warmup(self, warmup: ModeResult) -> None:
        """Count what the unmeasured warm-up opened: connections are the point of the demo."""
        self.connections_opened += warmup.connections_opened
        self.drivers_created += warmup.drivers_created
        self.errors += warmup.errors
        self.first_error = self.first_error or warmup.first_error
        self.connections_by_round.append(warmup.connections_opened)

    def summary(self) -> dict[str, Any]:
        """The figures the table, chart and JSON show."""
        figures = summarise_ms(self.durations_ms)
        return {
            "tasks": self.tasks,
            "seconds": round(self.seconds, 3),
            "tasks_per_s": round(len(self.durations_ms) / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": figures["p50_ms"],
            "p95_ms": figures["p95_ms"],
            "p99_ms": figures["p99_ms"],
            "mean_ms": figures["mean_ms"],
            "connections_opened": self.connections_opened,
            "drivers_created": self.drivers_created,
            "errors": self.errors,
            "first_error": self.first_error,
            "connections_by_round": self.connections_by_round,
        }

    def add(self, value: Any) -> None:
        """Add one task's report (see :func:`neopool.demo.workload.timed`).

        Counters are the process's: with tasks in flight at once (process-loop
        mode) each task's before/after overlap, so a process counts once, from
        the earliest ``before`` to the latest ``after`` of this mode's tasks
        (modes never run at the same time, so nothing else moves them).
        """
        self.durations_ms.append(float(value["ms"]))
        pid = int(value["pid"])
        before, after = value["before"], value["after"]
        if pid in self._span:
            first, last = self._span[pid]
            before = {k: min(int(v), int(before[k])) for k, v in first.items()}
            after = {k: max(int(v), int(after[k])) for k, v in last.items()}
        self._span[pid] = (before, after)

    def finish(self) -> None:
        """Count what each process opened while this mode ran (see :meth:`add`)."""
        for before, after in self._span.values():
            for counter in ("connections_opened", "drivers_created"):
                delta = int(after[counter]) - int(before[counter])
                setattr(self, counter, getattr(self, counter) + delta)
        self._span.clear()


def run_mode(
    app: Any,
    name: str,
    task_name: str,
    tasks: int,
    *,
    workspace: str,
    run_id: str,
    progress: Any = None,
) -> ModeResult:
    """Send ``tasks`` tasks of one mode at once and wait for them all.

    Throughput is tasks completed over the wall time from the first send to the
    last result; latency is each task's own duration, measured in the worker.
    """
    result = ModeResult(name, tasks)
    bar = progress.add_task(name, total=tasks) if progress is not None else None
    started = time.perf_counter()
    sent = [
        app.send_task(task_name, args=[workspace, f"{run_id}/{name}/{i}"]) for i in range(tasks)
    ]
    for async_result in sent:
        try:
            value = async_result.get(timeout=RESULT_TIMEOUT, propagate=False)
        except Exception as exc:  # a lost result counts as an error, not a crash
            value = exc
        if isinstance(value, dict) and async_result.successful():
            result.add(value)
        else:
            result.errors += 1
            result.first_error = result.first_error or f"{type(value).__name__}: {value}"
        if progress is not None:
            progress.advance(bar)
    result.seconds = time.perf_counter() - started
    result.finish()
    for async_result in sent:
        async_result.forget()  # results were read: do not leave them on the broker
    return result
