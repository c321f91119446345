"""The FastAPI application: settings, engine and metrics on `app.state`, routers, error handlers, middleware."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import errors
from server.engines import create_engine, resolve_engine_name
from server.engines.base import Engine
from server.metrics import Metrics
from server.middleware import RequestContext
from server.routes import ROUTERS
from server.settings import Settings

log = logging.getLogger("sevi.server")

DESCRIPTION = """\
Vision-language model serving with SEVI attention alignment against hallucination.

Every generation endpoint takes `conservativeness` (0 = the unmodified model, 0.5 = Balanced, 1 = Focused,
or a preset name) and reports the SEVI parameters it applied in `alignment`. Errors use the OpenAI body
`{"error": {"message", "type", "param", "code"}}`.
"""


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """An app serving `engine` (default: the one `settings.engine` names). The engine starts with the app."""
    engine = engine or create_engine(settings)

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
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="sevi-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    metrics = Metrics(engine.stats)
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.started = int(time.time())
    errors.install(app, settings.retry_after_s)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(RequestContext, metrics=metrics, max_body=settings.max_request_bytes)
    return app
