"""The version of neopool, in one place (read by hatch, the package and the default user agent)."""

__version__ = "0.2.0"
