"""The one place that turns failures into OpenAI-shaped error responses."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import RahfError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 410: "not_found_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded"}


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "code": code,
                      "param": param}}


def error_response(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status)


def from_exception(err: RahfError) -> JSONResponse:
    return error_response(err.status, str(err), err.code)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RahfError)
    async def _rahf(_: Request, err: RahfError) -> JSONResponse:
        return from_exception(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "extra_forbidden":
            message = f"unsupported field {param!r}: rahf-serve does not implement it; remove it from the request"
        else:
            message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
            message += f" (at {param})" if param else ""
        return error_response(400, message, "invalid_request", param)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), "http_error")
