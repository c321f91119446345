"""Liveness and readiness probes (no API key: orchestrators call them)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.deps import EngineDep

router = APIRouter(tags=["probes"])


@router.get("/health", summary="Liveness: the process can serve (503 if the model failed to load or the engine died).")
async def health(engine: EngineDep) -> JSONResponse:
    if engine.load_error:
        return JSONResponse({"status": "error", "detail": engine.load_error}, status_code=503)
    alive = engine.health()
    if not alive.alive:
        return JSONResponse({"status": "dead", "detail": alive.reason}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready", summary="Readiness: the model is loaded and requests can run.")
async def ready(engine: EngineDep) -> JSONResponse:
    alive = engine.health()
    if not alive.alive:  # no Retry-After: this process will not recover; it exits and is restarted
        return JSONResponse({"status": "dead", "detail": alive.reason}, status_code=503)
    if engine.ready:
        # The dtype, the aligned kernel and (vLLM on CPU) the cache layout: which path this machine runs.
        return JSONResponse({"status": "ready", "model": engine.model_name, **engine.serving_details})
    detail = engine.load_error or "loading"
    return JSONResponse({"status": "not ready", "detail": detail}, status_code=503, headers={"Retry-After": "1"})
