"""The closing lines of ``make test``: each stage's time and outcome, then the tests in all.

    python scripts/ci_summary.py [build/ci]

Reads ``stages.txt`` (written by ``scripts/stage``) and the JUnit XML report of every
pytest run (``junit/*.xml``). Exits 1 when a stage failed, when a pytest run that was
started left no report, or when a run executed no test (pytest's exit code 5, or every
test skipped or deselected): a run that tested nothing must not pass for one that did.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def _runs(junit: Path) -> dict[str, dict[str, int]]:
    """Per pytest run (its report's name): passed, failed, skipped."""
    runs: dict[str, dict[str, int]] = {}
    for report in sorted(junit.glob("*.xml")):
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        root = ElementTree.parse(report).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in suites:
            tests = int(suite.get("tests", 0))
            failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skipped = int(suite.get("skipped", 0))
            counts["failed"] += failed
            counts["skipped"] += skipped
            counts["passed"] += tests - failed - skipped
        runs[report.stem] = counts
    return runs


def main(argv: list[str]) -> int:
    directory = Path(argv[0] if argv else "build/ci")
    problems: list[str] = []
    stages_file = directory / "stages.txt"
    stages = stages_file.read_text().split("\n") if stages_file.exists() else []
    runs = _runs(directory / "junit")
    print("\nstage                          seconds  result")
    for line in filter(None, stages):
        name, milliseconds, code = line.split()
        result = "ok" if code == "0" else f"FAILED (exit {code})"
        if code == "5":
            result = "FAILED (exit 5: no tests ran)"
        print(f"{name:<30} {int(milliseconds) / 1000:>7.1f}  {result}")
        if code != "0":
            problems.append(f"stage {name} {result}")
    total = {"passed": 0, "failed": 0, "skipped": 0}
    print("\npytest run                     passed  failed  skipped")
    for name, counts in runs.items():
        print(f"{name:<30} {counts['passed']:>6}  {counts['failed']:>6}  {counts['skipped']:>7}")
        for key in total:
            total[key] += counts[key]
        if counts["passed"] == 0:
            problems.append(f"pytest run {name} executed no test")
    started = {line.split()[0] for line in stages if line.startswith(("pytest:", "pytest-"))}
    for name in sorted(started - {f"pytest:{run}" for run in runs}):
        problems.append(f"stage {name} left no test report")
    for problem in problems:
        print(f"*** {problem}")
    print(f"\nci: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    return 1 if problems or total["failed"] or not runs else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
