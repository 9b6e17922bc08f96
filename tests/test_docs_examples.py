"""Every ```python block of README.md and docs/**/*.md runs here, against a real server.

Each block runs as a script in a fresh interpreter, in a working directory
shared by the blocks of its page, with ``NEO4J_URI``, ``NEO4J_USERNAME`` and
``NEO4J_PASSWORD`` naming the session's Bolt server (and ``CELERY_BROKER_URL``
the session's broker, for blocks that read it). An HTML comment on the line
before a block changes what happens to it:

``<!-- example: file proj.py -->``
    the block is a module other blocks import: it is written to ``proj.py``
    in the page's directory and must import cleanly.
``<!-- example: worker proj -->``
    run the block while ``celery -A proj worker`` runs in that directory.
``<!-- example: requires lightrag -->``
    run the block only where the named module is installed.
``<!-- example: skip <reason> -->``
    only compile the block (for the few that cannot run on their own).

Fragments that cannot run on their own use a ```py or ```text fence instead,
which this file leaves alone. The configuration table of
docs/reference/configuration.md is also checked against the model here.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from neopool.testing import BoltTarget
from polling import eventually

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_BLOCK = re.compile(
    r"(?:^<!--\s*example:\s*(?P<directive>[^>]*?)\s*-->[ \t]*\n)?"
    r"^```python[^\n]*\n(?P<code>.*?)^```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_ENV_NAMES = ("NEO4J_", "NEOPOOL_", "CELERY_")


@dataclass(frozen=True)
class Example:
    page: Path
    line: int
    code: str
    directive: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def action(self) -> str:
        return self.directive.split(maxsplit=1)[0] if self.directive else "run"

    @property
    def argument(self) -> str:
        parts = self.directive.split(maxsplit=1)
        return parts[1] if len(parts) > 1 else ""


def examples() -> list[Example]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("code"))
            found.append(Example(page, line, match["code"], match["directive"] or ""))
    return found


EXAMPLES = examples()


def test_every_page_has_examples() -> None:
    pages = {example.page for example in EXAMPLES}
    assert ROOT / "README.md" in pages
    assert all(e.action in {"run", "file", "worker", "requires", "skip"} for e in EXAMPLES), [
        e.id for e in EXAMPLES if e.action not in {"run", "file", "worker", "requires", "skip"}
    ]


def test_skipped_examples_are_few_and_say_why() -> None:
    skipped = [e for e in EXAMPLES if e.action == "skip"]
    assert all(e.argument for e in skipped), "a skipped example must give its reason"
    assert len(skipped) <= max(3, len(EXAMPLES) // 5), [e.id for e in skipped]


CONFIG_PAGE = ROOT / "docs" / "reference" / "configuration.md"


def test_the_configuration_table_matches_the_model() -> None:
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts/config_table.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = CONFIG_PAGE.read_text()
    assert module.render(page) == page, (
        "docs/reference/configuration.md's table is out of date: run "
        "'python scripts/config_table.py --write'"
    )


def _anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a page."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_point_somewhere(page: Path) -> None:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        missing_anchor = bool(anchor) and linked.suffix == ".md" and linked.exists()
        if missing_anchor:
            missing_anchor = anchor not in _anchors(linked.read_text())
        if missing_anchor or not linked.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to what does not exist: {broken}"


def _workdir(page: Path, base: Path) -> Path:
    """The page's directory, with every ``file`` block of the page written into it."""
    workdir = base / str(page.relative_to(ROOT).with_suffix("")).replace("/", "-")
    workdir.mkdir(parents=True, exist_ok=True)
    for example in EXAMPLES:
        if example.page == page and example.action == "file":
            (workdir / example.argument).write_text(example.code)
    return workdir


def _environment(
    example: Example, bolt: BoltTarget, request: pytest.FixtureRequest
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_NAMES)}
    env.update(NEO4J_URI=bolt.uri, NEO4J_USERNAME=bolt.username, NEO4J_PASSWORD=bolt.password)
    page_code = "".join(e.code for e in EXAMPLES if e.page == example.page)
    if "CELERY_BROKER_URL" in page_code:
        env["CELERY_BROKER_URL"] = request.getfixturevalue("neopool_broker_url")
    env.pop("PYTHONPATH", None)
    return env


def _run(command: list[str], cwd: Path, env: dict[str, str], what: str) -> None:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{what} failed:\n{result.stdout}\n{result.stderr}"


@contextlib.contextmanager
def _celery_worker(module: str, cwd: Path, env: dict[str, str]) -> Iterator[None]:
    """``celery -A module worker`` in ``cwd``, ready to take tasks, stopped warm afterwards."""
    log = cwd / f"{module}-worker.log"
    with log.open("w") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", module, "worker", "--concurrency=2",
             "--loglevel=INFO", "--without-gossip", "--without-mingle"],
            cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # Ready, or gone: either ends the wait.
        eventually(lambda: "ready." in log.read_text() or worker.poll() is not None, timeout=60)
        assert worker.poll() is None, f"the worker exited:\n{log.read_text()}"
        assert "ready." in log.read_text(), f"the worker did not start:\n{log.read_text()}"
        yield
    finally:
        worker.send_signal(signal.SIGTERM)  # warm shutdown: pools close on their loops
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, f"the worker failed:\n{log.read_text()}"


@pytest.mark.subprocess  # each example in a fresh interpreter
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_example(
    example: Example,
    neopool_bolt: BoltTarget,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    compile(example.code, example.id, "exec")
    if example.action == "skip":
        pytest.skip(f"not run on its own: {example.argument}")
    if example.action == "requires" and importlib.util.find_spec(example.argument) is None:
        pytest.skip(f"needs {example.argument}, which is not installed")
    workdir = _workdir(example.page, tmp_path_factory.getbasetemp() / "docs-examples")
    env = _environment(example, neopool_bolt, request)
    if example.action == "file":
        module = Path(example.argument).stem
        _run([sys.executable, "-c", f"import {module}"], workdir, env, f"import {module}")
        return
    script = workdir / f"example_{example.line}.py"
    script.write_text(example.code)
    if example.action == "worker":
        with _celery_worker(example.argument, workdir, env):
            _run([sys.executable, script.name], workdir, env, example.id)
    else:
        _run([sys.executable, script.name], workdir, env, example.id)


#: The public modules: each has a page of the API reference generated from its docstrings.
PUBLIC_MODULES = (
    "neopool",
    "neopool.runner",
    "neopool.celery",
    "neopool.integrations.lightrag",
    "neopool.metrics",
    "neopool.testing",
)


def test_the_api_reference_covers_every_public_module() -> None:
    reference = "".join(p.read_text() for p in (ROOT / "docs/reference/api").glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)\s*$", reference, re.MULTILINE))
    assert documented == set(PUBLIC_MODULES), documented ^ set(PUBLIC_MODULES)
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")]
    assert [p for p in pages if p not in nav] == [], "pages missing from mkdocs.yml's nav"


@pytest.mark.parametrize("name", [m for m in PUBLIC_MODULES if m != "neopool"])
def test_a_module_page_documents_what_the_module_defines(name: str) -> None:
    """Its ``__all__`` (what its API page shows) lists every public function it defines, and
    no class or function of another module: ``neopool``'s own page shows the errors, once."""
    if name == "neopool.integrations.lightrag":
        pytest.importorskip("lightrag")
    module = importlib.import_module(name)
    exported = {n: getattr(module, n) for n in module.__all__}
    foreign = [
        n
        for n, value in exported.items()
        if (inspect.isclass(value) or inspect.isfunction(value))
        and not value.__module__.startswith(name)
    ]
    assert foreign == [], f"{name}.__all__ lists names defined elsewhere"
    unlisted = [
        n
        for n, value in vars(module).items()
        if not n.startswith("_")
        and inspect.isfunction(value)
        and value.__module__ == name
        and n not in exported
    ]
    assert unlisted == [], f"public functions of {name} missing from its __all__"
