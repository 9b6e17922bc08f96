"""``neopool demo`` as a user runs it: a real subprocess, real servers, a real SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from neopool.cli import build_parser, main
from neopool.testing import BoltTarget

pytestmark = pytest.mark.celery

DEMO = [sys.executable, "-c", "import sys; from neopool.cli import main; sys.exit(main())", "demo"]
MODE_KEYS = {
    "tasks_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "connections_opened",
    "drivers_created",
    "errors",
}


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--tasks",
        "--workers",
        "--in-flight",
        "--rtt-ms",
        "--json",
        "--no-chart",
        "--metrics-port",
    ):
        assert option in text
    assert "Ctrl-C" in text


def test_bad_option_values_are_refused() -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--tasks", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--rtt-ms", "-1"])


@pytest.mark.subprocess
def test_small_run_writes_results_without_errors(
    tmp_path: Path, neopool_bolt: BoltTarget, neopool_broker_url: str
) -> None:
    env = {
        **os.environ,
        "NEO4J_URI": neopool_bolt.uri,
        "NEO4J_USERNAME": neopool_bolt.username,
        "NEO4J_PASSWORD": neopool_bolt.password,
        "NEO4J_DATABASE": os.environ.get("NEO4J_DATABASE", "neo4j"),
        "NEOPOOL_DEMO_BROKER_URL": neopool_broker_url,
    }
    out = tmp_path / "demo.json"
    done = subprocess.run(
        [*DEMO, "--tasks", "20", "--in-flight", "4", "--no-chart", "--json", str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert neopool_bolt.password not in done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert set(results) >= {"modes", "machine", "settings"}
    modes = results["modes"]
    assert list(modes) == [
        "new driver per task",
        "neopool + asyncio.run per task",
        "neopool + persistent runner",
        "neopool + process loop (threads pool)",
    ]
    for figures in modes.values():
        assert set(figures) >= MODE_KEYS
        assert figures["errors"] == 0
        assert figures["tasks_per_s"] > 0
    settings = results["settings"]
    ran = settings["tasks_per_mode"] + settings["warmup_tasks_per_mode"]  # warm-up is counted
    assert modes["new driver per task"]["drivers_created"] == ran
    assert modes["new driver per task"]["connections_opened"] >= ran
    # The persistent runner opens one driver per worker process (at most), whatever the tasks.
    assert modes["neopool + persistent runner"]["drivers_created"] <= 2
    assert modes["neopool + persistent runner"]["connections_opened"] <= 2 * 4
    # The process loop: one driver for the whole worker, sockets bounded by tasks in flight.
    process_loop = modes["neopool + process loop (threads pool)"]
    assert process_loop["drivers_created"] == 1
    assert process_loop["connections_opened"] <= 4 + 2
    assert settings["workers"]["neopool + process loop (threads pool)"] == (
        "threads -c 4, process loop"
    )
    assert not (tmp_path / "demo.png").exists()
    assert "neopool_stats" in done.stdout


def _start_with_sigint_ignored() -> None:
    """As a background job of a script starts: SIGINT ignored, so no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.server  # the demo starts its own servers
@pytest.mark.subprocess
def test_ctrl_c_stops_worker_and_servers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "NEOPOOL_"))}
    env.pop("CELERY_BROKER_URL", None)
    demo = subprocess.Popen(
        [*DEMO, "--tasks", "5000", "--no-chart", "--json", str(tmp_path / "out.json")],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_start_with_sigint_ignored,  # the demo must handle Ctrl-C itself
    )
    try:
        deadline = time.monotonic() + 150
        seen = ""
        assert demo.stderr is not None
        while time.monotonic() < deadline and demo.poll() is None:
            line = demo.stderr.readline()
            seen += line
            if "warming up" in line:  # the worker is up and tasks are flowing
                break
        assert "warming up" in seen, seen[-3000:]
        children = psutil.Process(demo.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "celery" in names
        assert "ArcadeDBServer" in names
        assert "valkey" in names

        demo.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, rest = demo.communicate(timeout=150)
        stopping = time.monotonic() - started
        assert demo.returncode == 130, (seen + rest, stopping)
        assert "interrupted" in rest
        _gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
        assert not (tmp_path / "out.json").exists()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
