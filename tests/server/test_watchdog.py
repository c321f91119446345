"""The watchdog acts on any engine's liveness: nothing while alive; once dead, one exit request after the grace."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from server.watchdog import ENGINE_DEAD_EXIT_CODE, EngineWatchdog
from sevi.engines.api import EngineHealth
from tests.support.waiting import eventually_async


class FakeEngine:
    def __init__(self) -> None:
        self.state = EngineHealth(True)

    def health(self) -> EngineHealth:
        return self.state


def test_no_exit_while_alive_then_one_exit_after_the_grace() -> None:
    engine = FakeEngine()
    exits: list[int] = []
    dog = EngineWatchdog(engine, exit_after_s=0.3, exit_process=exits.append, interval_s=0.02)  # type: ignore[arg-type]

    async def scenario() -> None:
        task = asyncio.create_task(dog.run())
        await asyncio.sleep(0.2)
        assert exits == [] and dog.dead_since is None
        engine.state = EngineHealth(False, "worker 1 exited")
        t0 = time.monotonic()
        await eventually_async(lambda: bool(exits), 5, 0.02, what="the watchdog to ask for the exit")
        assert time.monotonic() - t0 >= 0.3
        await asyncio.wait_for(task, 1)  # the watchdog stops once it asked for the exit

    asyncio.run(scenario())
    assert exits == [ENGINE_DEAD_EXIT_CODE]


def test_without_an_exit_hook_it_only_notes_the_death(caplog: Any) -> None:
    engine = FakeEngine()
    engine.state = EngineHealth(False, "the engine's worker thread 'x' exited")
    dog = EngineWatchdog(engine, exit_after_s=0, exit_process=None)  # type: ignore[arg-type]
    with caplog.at_level("ERROR", logger="sevi.watchdog"):
        dog.check()
        dog.check()
    assert dog.dead_since is not None and not dog.exit_requested
    assert [r.getMessage() for r in caplog.records].count(
        "engine dead: the engine's worker thread 'x' exited; no exit hook, serving 503s"
    ) == 1
