"""The pytest plugin (``neopool.testing.plugin``) is there once, whichever way it came in."""

from __future__ import annotations

import pytest

import neopool.testing.plugin


def test_the_plugin_is_registered_once_under_its_entry_point_name(
    pytestconfig: pytest.Config,
) -> None:
    manager = pytestconfig.pluginmanager
    registered = [p for p in manager.get_plugins() if p is neopool.testing.plugin]
    assert len(registered) == 1
    assert manager.get_plugin("neopool") is neopool.testing.plugin
