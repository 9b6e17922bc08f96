"""The suite runs on real servers: see neopool.testing.plugin for the fixtures."""

pytest_plugins = ["neopool.testing.plugin"]
