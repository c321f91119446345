"""Dependency-injected handles: settings, engine and metrics live on `app.state`, the request's arrival on its
scope (set by the middleware); routes ask for them here."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import APIError
from server.metrics import Metrics
from server.middleware import Arrival
from server.settings import Settings
from sevi.engines.api import Engine


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def get_arrival(request: Request) -> Arrival:
    """The request's arrival, as the middleware noted it (now, for an app mounted without it)."""
    arrival = getattr(request.state, "arrival", None)
    if arrival is None:
        arrival = Arrival.now()
        request.state.arrival = arrival
    assert isinstance(arrival, Arrival)
    return arrival


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ArrivalDep = Annotated[Arrival, Depends(get_arrival)]

_bearer = HTTPBearer(auto_error=False, description="The server's api_key, when one is configured.")


def require_api_key(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    if settings.api_key is None:
        return
    if credentials is None:
        raise APIError(
            401,
            "missing API key: send `Authorization: Bearer <key>`",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    expected = settings.api_key.get_secret_value().encode()
    if not secrets.compare_digest(credentials.credentials.encode(), expected):
        raise APIError(
            401, "incorrect API key provided", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
