"""Things neopool starts for tests and demos: servers, proxies, worker processes."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

S = TypeVar("S", bound="Service")


class Service:
    """Something started and ended: ``with`` starts it and ends it however the block ends.

    Subclasses say how to start (:meth:`start`, returning the service) and what
    ending means for them (:meth:`end`: stop, and clean up what was made for it).
    """

    def start(self: S) -> S:
        raise NotImplementedError

    def end(self) -> None:
        """What leaving ``with`` does: stop, and remove what was made for the service."""
        raise NotImplementedError

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end()
