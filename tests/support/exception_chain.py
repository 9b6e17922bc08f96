"""What an exception was raised from, for tests that expect a failure with a given cause."""

from __future__ import annotations


def caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``error``, or any exception it was raised from or during, is a ``kind``.

    Follows ``__cause__`` (``raise ... from``), else ``__context__``, to the end of the chain:
    the driver wraps an ``ssl`` error in its own, which a test checks the reason of.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
