"""The engine watchdog: acts on an engine's liveness (`Engine.health()`), whatever the engine.

A dead engine must not leave a healthy-looking process behind: load balancers and `curl /ready` healthchecks
would keep sending it traffic, and a supervisor would never restart it. The watchdog polls `health()`; on the
first "dead" it logs what died, and after `exit_after_s` (the grace in which probes, scrapers and clients see
the 503s and `sevi_engine_up 0`) it asks for the process to exit with ENGINE_DEAD_EXIT_CODE. The probes and
the metric read `health()` themselves, and the engine itself ends its requests, so neither waits for a poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from sevi.engines.api import Engine

log = logging.getLogger("sevi.watchdog")

# Distinct from 1 (a crash) and 2 (bad settings): "the engine died, restart me".
ENGINE_DEAD_EXIT_CODE = 3


class EngineWatchdog:
    """Polls `engine.health()` every `interval_s`; `exit_process(code)` is called once, `exit_after_s` after the
    engine was first seen dead (None: never; an app embedded in tests or another process)."""

    def __init__(
        self,
        engine: Engine,
        exit_after_s: float,
        exit_process: Callable[[int], None] | None,
        interval_s: float = 0.5,
    ) -> None:
        self.engine = engine
        self.exit_after_s = exit_after_s
        self.exit_process = exit_process
        self.interval_s = interval_s
        self.dead_since: float | None = None
        self.exit_requested = False

    async def run(self) -> None:
        while not self.exit_requested:
            self.check()
            await asyncio.sleep(self.interval_s)

    def check(self) -> None:
        """One poll: note the death, and ask for the exit once the grace is over."""
        health = self.engine.health()
        if health.alive:
            return
        now = time.monotonic()
        if self.dead_since is None:
            self.dead_since = now
            action = f"exiting with status {ENGINE_DEAD_EXIT_CODE} in {self.exit_after_s:g} s"
            log.error(
                "engine dead: %s; %s",
                health.reason,
                action if self.exit_process is not None else "no exit hook, serving 503s",
                extra={"fields": {"cause": health.reason, "exit_after_s": self.exit_after_s}},
            )
        if self.exit_process is not None and now - self.dead_since >= self.exit_after_s:
            self.exit_requested = True
            log.error(
                "exiting: the engine is dead",
                extra={"fields": {"cause": health.reason, "exit_code": ENGINE_DEAD_EXIT_CODE}},
            )
            self.exit_process(ENGINE_DEAD_EXIT_CODE)
