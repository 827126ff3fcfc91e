"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("hexgen.server")
REJECTION_STATE_KEY = "rejection_reason"  # in the request scope's state: why the request was refused

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """A request that fails with an HTTP status and a message meant for the client."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def rejection_reason(self) -> str | None:
        """How `hexgen_requests_rejected_total` counts this error when it refuses a request (None: not a
        refusal but a fault of ours, counted by nothing but the log)."""
        if self.status == 401:
            return "unauthorized"
        if self.status == 413:
            return "too_large"
        if self.status == 503:
            return {"model_loading": "not_ready", "service_unavailable": "unavailable"}.get(self.code, "overloaded")
        if 400 <= self.status < 500:
            return "invalid_request"
        return None

    def body(self) -> dict:
        error_type = _TYPE_BY_STATUS.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}

    def to_response(self, scope: dict | None = None) -> JSONResponse:
        """The response; with the request's `scope`, also marks the request as refused for the metrics
        (the access-log middleware counts it once the response is sent)."""
        if scope is not None and self.rejection_reason is not None:
            scope.setdefault("state", {})[REJECTION_STATE_KEY] = self.rejection_reason
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def to_json(self) -> str:
        return json.dumps(self.body())


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def internal_error() -> APIError:
    return APIError(500, "internal server error (details are in the server log)", code="internal_error")


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union (`str | list[int]`) it tried in the error's location
    ("str", "list[int]"...): not a parameter the client sent."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "none"} or "[" in part)


def _validation_error(err: RequestValidationError) -> APIError:
    """The first pydantic complaint, phrased for a client, naming the parameter."""
    first = err.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_union_tag(part)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg")
        return bad_request(f"request body is not valid JSON: {detail}")
    if first.get("type") == "invalid_unicode":
        param = ".".join([*loc, *filter(None, [(first.get("ctx") or {}).get("param")])]) or None
        return bad_request(f"invalid value for {param!r}: {first.get('msg')}" if param else first.get("msg"), param)
    if first.get("type") == "extra_forbidden":
        return bad_request(f"unsupported parameter {param!r}", param=param)
    if first.get("type") == "missing" and not loc:
        return bad_request("request body is missing")
    return bad_request(f"invalid value for {param!r}: {first.get('msg')}" if param else first.get("msg"), param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.to_response(request.scope)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return _validation_error(err).to_response(request.scope)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        else:
            message = str(err.detail) if err.detail else HTTPStatus(err.status_code).phrase
        return APIError(err.status_code, message, headers=dict(err.headers or {})).to_response(request.scope)

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        logger.exception("internal error serving %s %s", request.method, request.url.path)
        return internal_error().to_response()
