"""`GET /v1/models`: the one served model, OpenAI-style."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.deps import EngineDep, require_api_key
from server.schemas.chat import ModelCard, ModelList

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])


@router.get("/v1/models", response_model=ModelList, summary="The served model.")
async def list_models(request: Request, engine: EngineDep) -> ModelList:
    layers = engine.num_layers if engine.ready else None
    return ModelList(data=[ModelCard(id=engine.model_name, created=request.app.state.started, num_layers=layers)])
