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

from sevi.engines.api import EngineDead, EngineError, EngineNotReady, EngineOverloaded, RequestError
from sevi.method.knob import AlignmentParamError

log = logging.getLogger("sevi.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class APIError(Exception):
    """Raise anywhere in a request to answer `status` with an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
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
    if isinstance(exc, EngineDead):  # a retry goes to another replica, or to this one once restarted
        return APIError(
            503,
            f"the engine died ({exc}); this server is restarting",
            code="engine_dead",
            type="server_error",
            headers={"Retry-After": str(retry_after_s)},
        )
    if isinstance(exc, EngineNotReady):
        return APIError(503, str(exc), code="model_not_ready", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, TimeoutError):
        return APIError(504, "the request ran past its deadline", code="timeout")
    if isinstance(exc, EngineError):
        return APIError(500, f"generation failed: {exc}", code="engine_error", type="server_error")
    return APIError(500, "internal server error", code="internal_error", type="server_error")


def _clean_loc(loc: Any) -> str:
    """`("body", "conservativeness", "float")` -> `"conservativeness"`: pydantic adds union member tags to locs."""
    return ".".join(str(p) for p in loc or () if isinstance(p, int) or (p not in _LOC_NOISE and "[" not in str(p)))


# Location roots and the union member tags pydantic puts in error locations.
_LOC_NOISE = frozenset({"body", "query", "path", "header", "str", "int", "float", "bool", "none", "dict", "list"})


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    param = _clean_loc(first.get("loc")) or None
    if first.get("type") == "missing" and param is None:
        return "request body is missing", None
    # A value that fits no member of a union fails once per member: say so once.
    same = [e for e in errors if (_clean_loc(e.get("loc")) or None) == param]
    msg = str(first.get("msg", "invalid request"))
    if len(same) > 1:
        msg = "invalid value (" + "; ".join(dict.fromkeys(str(e.get("msg")) for e in same)) + ")"
    more = len(errors) - len(same)
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return (f"{param}: {msg}{tail}" if param else f"{msg}{tail}"), param


def install(app: FastAPI, retry_after_s: int) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(from_exception(exc, retry_after_s), request)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(list(exc.errors()))
        return error_response(APIError(400, message, param=param, code="invalid_value"), request)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        err = APIError(
            exc.status_code,
            str(exc.detail),
            code="not_found" if exc.status_code == 404 else None,
            headers=dict(exc.headers) if exc.headers else None,
        )
        return error_response(err, request)

    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(from_exception(exc), request)

    for cls in (APIError, AlignmentParamError, RequestError, EngineError, EngineOverloaded, EngineNotReady):
        app.add_exception_handler(cls, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unhandled)


def from_validation_errors(errors: list[Any]) -> APIError:
    """The 400 for pydantic validation errors, as the app's handler answers them (the batch command's lines too)."""
    message, param = _validation_message(errors)
    return APIError(400, message, param=param, code="invalid_value")
