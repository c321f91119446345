"""Errors in the OpenAI body `{"error": {"message", "type", "param", "code"}}`, one handler per kind.

Every failure a client can cause maps to a 4xx here; only a bug reaches the catch-all 500, which is
logged with its traceback. FastAPI's 422 validation errors become 400, as OpenAI's API answers.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.conservativeness import AlignmentParamError
from models.generation import RequestError
from server.engines.base import EngineError, EngineNotReady, EngineOverloaded

log = logging.getLogger("sevi.server")

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
    405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
    503: "overloaded_error", 504: "timeout_error",
}


class APIError(Exception):
    """Raise anywhere in a request to answer `status` with an OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(err: APIError, request: Request | None = None) -> JSONResponse:
    if request is not None:
        # The request log line (middleware) reports why the request failed.
        request.state.error = err.message[:300]
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def from_exception(exc: BaseException, retry_after_s: int = 1) -> APIError:
    """The API error for an exception raised while serving a request (engine, model or knob errors)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AlignmentParamError):
        return APIError(400, str(exc), param=exc.param, code="invalid_alignment")
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), param=exc.param, code="invalid_request")
    if isinstance(exc, EngineOverloaded):
        return APIError(503, str(exc), code="server_overloaded", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, EngineNotReady):
        return APIError(503, str(exc), code="model_not_ready", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, TimeoutError):
        return APIError(504, "the request ran past its deadline", code="timeout")
    if isinstance(exc, EngineError):
        return APIError(500, f"generation failed: {exc}", code="engine_error", type="server_error")
    return APIError(500, "internal server error", code="internal_error", type="server_error")


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if first.get("type") == "missing" and not loc:
        return "request body is missing", None
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def install(app: FastAPI, retry_after_s: int) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(from_exception(exc, retry_after_s), request)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(list(exc.errors()))
        return error_response(APIError(400, message, param=param, code="invalid_value"), request)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        err = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                       headers=dict(exc.headers) if exc.headers else None)
        return error_response(err, request)

    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(from_exception(exc), request)

    for cls in (APIError, AlignmentParamError, RequestError, EngineError, EngineOverloaded, EngineNotReady):
        app.add_exception_handler(cls, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unhandled)
