"""The FastAPI application: settings, engine and metrics on `app.state`, routers, error handlers, middleware."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import errors
from server.metrics import Metrics
from server.middleware import RequestContext
from server.routes import ROUTERS
from server.settings import Settings
from server.watchdog import EngineWatchdog
from sevi.engines import create_engine, resolve_engine_name
from sevi.engines.api import Engine

log = logging.getLogger("sevi.server")

DESCRIPTION = """\
Vision-language model serving with SEVI attention alignment against hallucination.

Every generation endpoint takes `conservativeness` (0 = the unmodified model, 0.5 = Balanced, 1 = Focused,
or a preset name) and reports the SEVI parameters it applied in `alignment`. Errors use the OpenAI body
`{"error": {"message", "type", "param", "code"}}`.
"""


def create_app(
    settings: Settings, engine: Engine | None = None, exit_process: Callable[[int], None] | None = None
) -> FastAPI:
    """An app serving `engine` (default: the one `settings.engine` names). The engine starts with the app.

    `exit_process(code)` is how the app ends its process once the engine is dead (server/watchdog.py); `python -m
    server` passes one, an app embedded elsewhere (tests) may not, and then only answers 503s."""
    engine = engine or create_engine(settings)
    watchdog = EngineWatchdog(engine, settings.engine_dead_exit_after_s, exit_process)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        fields = {
            "model": engine.model_name,
            "engine": resolve_engine_name(settings.engine),
            "host": settings.host,
            "port": settings.port,
        }
        log.info("serving", extra={"fields": fields})
        watching = asyncio.create_task(watchdog.run(), name="sevi-engine-watchdog")
        try:
            yield
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            await engine.stop()

    app = FastAPI(title="sevi-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    metrics = Metrics(engine.stats, lambda: engine.health().alive and engine.load_error is None)
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.watchdog = watchdog
    app.state.started = int(time.time())
    errors.install(app, settings.retry_after_s)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(RequestContext, metrics=metrics, max_body=settings.max_request_bytes)
    return app
