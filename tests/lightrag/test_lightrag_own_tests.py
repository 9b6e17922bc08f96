"""LightRAG's own graph-storage tests, run unchanged on PooledNeo4JStorage and on stock.

lightrag-hku's source distributions up to 1.4.x ship ``tests/test_graph_storage.py``
(1.5.x's do not). It is downloaded here with pip at test time, never copied into
this project, and run by pytest in a child process, once with
``LIGHTRAG_GRAPH_STORAGE=PooledNeo4JStorage`` and once with ``Neo4JStorage``,
against the same server and the installed LightRAG. Its tests catch their own
exceptions and ``return False``; the harness (a conftest written next to the
file) counts that as a failure. Both runs must have the same outcome for every
test, and every test must pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

pytest.importorskip("lightrag", reason="needs lightrag-hku (pip install 'neopool[lightrag]')")

from neopool.testing import BoltTarget

pytestmark = [pytest.mark.lightrag, pytest.mark.timeout(300)]

#: The last lightrag-hku release whose sdist ships tests/test_graph_storage.py.
SDIST_VERSION = "1.4.16"
SUITE = "tests/test_graph_storage.py"

#: Written next to the downloaded file: registers the pooled storage, and makes a
#: test that returns False fail (pytest would only warn about the return value).
HARNESS = textwrap.dedent(
    """
    import functools
    import inspect

    from neopool.integrations.lightrag import register

    register()


    def _failing_on_false(function):
        @functools.wraps(function)
        async def test(*args, **kwargs):
            result = await function(*args, **kwargs)
            assert result is not False, (
                f"{function.__name__} returned False: it caught an error (printed above)"
            )

        return test


    def pytest_collection_modifyitems(items):
        for item in items:
            if inspect.iscoroutinefunction(getattr(item, "obj", None)):
                item.obj = _failing_on_false(item.obj)
    """
)


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with LightRAG's test file and the harness, or a skip saying why not."""
    folder = tmp_path_factory.mktemp("lightrag-own-tests")
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         f"lightrag-hku=={SDIST_VERSION}", "-d", str(folder / "sdist"), "--quiet"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    archives = list((folder / "sdist").glob("*.tar.gz"))
    if download.returncode != 0 or not archives:
        pytest.skip(
            f"could not download the lightrag-hku {SDIST_VERSION} sdist with pip "
            f"(no package index?): {download.stderr.strip()[-500:]}"
        )
    with tarfile.open(archives[0]) as archive:
        member = archive.getmember(f"lightrag_hku-{SDIST_VERSION}/{SUITE}")
        source = archive.extractfile(member)
        assert source is not None
        (folder / "test_graph_storage.py").write_bytes(source.read())
    (folder / "conftest.py").write_text(HARNESS)
    return folder


def run_suite(folder: Path, storage: str, bolt: BoltTarget) -> dict[str, str]:
    """``{test name: "passed" | "failed" | "skipped"}`` of one run of the file."""
    report = folder / f"{storage}.xml"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NEO4J_")},
        "LIGHTRAG_GRAPH_STORAGE": storage,
        "NEO4J_URI": bolt.uri,
        "NEO4J_USERNAME": bolt.username,
        "NEO4J_PASSWORD": bolt.password,
    }
    if not bolt.is_neo4j:
        # Stock Neo4JStorage cannot fall back to ArcadeDB's database by itself (its
        # CREATE DATABASE error is not one it expects); PooledNeo4JStorage can.
        env["NEO4J_DATABASE"] = "neo4j"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "test_graph_storage.py", "-p", "no:cacheprovider",
         "-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function",
         f"--junitxml={report}", "-q", "-rs", "--timeout=120"],
        cwd=folder, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=280, check=False,
    )  # fmt: skip
    assert report.exists(), (
        f"the run with {storage} did not report:\n{result.stdout}\n{result.stderr}"
    )
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[case.attrib["name"]] = "failed"
        elif case.find("skipped") is not None:
            outcomes[case.attrib["name"]] = "skipped"
        else:
            outcomes[case.attrib["name"]] = "passed"
    assert outcomes, f"no test ran with {storage}:\n{result.stdout[-3000:]}"
    if any(outcome != "passed" for outcome in outcomes.values()):
        print(f"--- {storage}:\n{result.stdout[-6000:]}")
    return outcomes


def test_lightrags_graph_storage_tests_pass_alike_on_pooled_and_stock(
    suite_dir: Path, neopool_bolt: BoltTarget
) -> None:
    pooled = run_suite(suite_dir, "PooledNeo4JStorage", neopool_bolt)
    stock = run_suite(suite_dir, "Neo4JStorage", neopool_bolt)
    assert pooled == stock
    assert len(pooled) >= 6
    assert set(pooled.values()) == {"passed"}, pooled
