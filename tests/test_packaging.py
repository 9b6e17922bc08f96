"""The wheel users get from PyPI: built, installed in a fresh virtualenv, imported.

This builds ``neopool-<version>-py3-none-any.whl`` from the source tree with
``python -m build --wheel``, installs it (with its core dependencies only, from
the package index) into a new virtualenv, and imports it there, away from the
source tree. Marked ``packaging`` so the core subset on other interpreters can
leave it out (``-m "not packaging"``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

import neopool

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]

#: The public names of the design note, which must import from an installed wheel.
NOTE_NAMES = (
    "Neo4jConnectionConfig",
    "GlobalNeo4jConnectionPool",
    "EventLoopConnectionPool",
    "PooledConnectionManager",
    "BorrowedConnection",
    "Neo4jConnectionFactory",
)

CHECK = textwrap.dedent(
    """
    import importlib.metadata, json, pathlib, sys
    import neopool
    from neopool import (Neo4jConnectionConfig, GlobalNeo4jConnectionPool,
        EventLoopConnectionPool, PooledConnectionManager, BorrowedConnection,
        Neo4jConnectionFactory)
    package = pathlib.Path(neopool.__file__).parent
    print(json.dumps({
        "version": neopool.__version__,
        "metadata_version": importlib.metadata.version("neopool"),
        "location": str(package),
        "py_typed": (package / "py.typed").is_file(),
        "names": [name for name in sys.argv[1:] if hasattr(neopool, name)],
        "requires_python": importlib.metadata.metadata("neopool")["Requires-Python"],
        "extras": sorted(importlib.metadata.metadata("neopool").get_all("Provides-Extra")),
    }))
    """
)


def run(*command: str | Path, cwd: Path) -> str:
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} failed ({result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def test_the_wheel_installs_and_imports_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--wheel", "--outdir", dist, ROOT, cwd=tmp_path)
    wheels = list(dist.glob("neopool-*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]
    assert wheel.name == f"neopool-{neopool.__version__}-py3-none-any.whl"

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    run(
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        wheel,
        cwd=tmp_path,
    )

    # -I: ignore PYTHONPATH and the user site, so the source tree cannot leak in.
    report = json.loads(run(python, "-I", "-c", CHECK, *NOTE_NAMES, cwd=tmp_path))
    assert report["version"] == neopool.__version__
    assert report["metadata_version"] == neopool.__version__
    assert Path(report["location"]).is_relative_to(env_dir)
    assert report["py_typed"], "py.typed is missing from the installed package"
    assert report["names"] == list(NOTE_NAMES)
    assert report["requires_python"] == ">=3.10"
    assert {"celery", "lightrag", "embedded", "prometheus", "dev", "all"} <= set(report["extras"])
