"""`eventually()`: the one poll-until-deadline loop of the tests (a server becoming ready, a request cancelled, a
line logged, a process refusing connections). A wait that runs out fails with what it waited for.

The predicate is called every `interval_s` until it returns something truthy, and once more at the deadline, so a
slow poll never fails a condition that held in time. Errors of the types in `ignore` (by default httpx's: a server
starting or going away refuses connections) count as "not yet" and the last one is named in the failure; any other
error, an assertion inside the predicate included, ends the wait at once (a load error need not wait out the
timeout).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

Errors = tuple[type[BaseException], ...]
NOT_YET: Errors = (httpx.HTTPError,)  # a server starting or going away refuses connections


class WaitTimeout(AssertionError):
    """A wait that ran out (an AssertionError: pytest reports it as a failed check, with its message)."""


def eventually(
    predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.05, *, what: str, ignore: Errors = NOT_YET
) -> float:
    """Seconds until `predicate()` held; raises WaitTimeout naming `what` ("the server to answer /ready") if it did
    not within `timeout_s`."""
    poll = _Poll(predicate, timeout_s, interval_s, what, ignore)
    while (pause := poll.pause()) is not None:
        time.sleep(pause)
    return poll.waited_s


async def eventually_async(
    predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.05, *, what: str, ignore: Errors = NOT_YET
) -> float:
    """`eventually` inside an event loop: it sleeps with asyncio, so the tasks it waits on run meanwhile."""
    poll = _Poll(predicate, timeout_s, interval_s, what, ignore)
    while (pause := poll.pause()) is not None:
        await asyncio.sleep(pause)
    return poll.waited_s


class _Poll:
    """One wait's state; the two loops above differ only in how they sleep."""

    def __init__(
        self, predicate: Callable[[], object], timeout_s: float, interval_s: float, what: str, ignore: Errors
    ) -> None:
        self.predicate, self.timeout_s, self.interval_s = predicate, timeout_s, interval_s
        self.what, self.ignore = what, ignore
        self.start = time.monotonic()
        self.waited_s = 0.0
        self.last_error: BaseException | None = None

    def pause(self) -> float | None:
        """None once the predicate held, else the seconds to sleep before the next try; WaitTimeout past the end."""
        try:
            held = bool(self.predicate())
        except self.ignore as exc:
            held, self.last_error = False, exc
        self.waited_s = time.monotonic() - self.start
        if held:
            return None
        if self.waited_s >= self.timeout_s:
            message = f"timed out after {self.timeout_s:g} s waiting for {self.what}"
            if self.last_error is not None:
                message += f" (last error: {type(self.last_error).__name__}: {self.last_error})"
            raise WaitTimeout(message)
        return min(self.interval_s, self.timeout_s - self.waited_s)
