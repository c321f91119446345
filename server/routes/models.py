"""`GET /v1/models`: the one served model, OpenAI-style, with its conservativeness map."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.deps import EngineDep, require_api_key
from server.schemas.models import KnobMapCard, ServedModelCard, ServedModelList

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])


@router.get("/v1/models", response_model=ServedModelList, summary="The served model.")
async def list_models(request: Request, engine: EngineDep) -> ServedModelList:
    layers = engine.num_layers if engine.ready else None
    knobs = KnobMapCard.model_validate(engine.knob_map.describe(layers))
    return ServedModelList(
        data=[
            ServedModelCard(
                id=engine.model_name, created=request.app.state.started, num_layers=layers, conservativeness=knobs
            )
        ]
    )
