"""ASGI middleware: request ids, structured access logs and the count of refused requests, the API key
check (before the body is read), the body size limit."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import REJECTION_STATE_KEY, APIError

access_logger = logging.getLogger("hexgen.access")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class AccessLogMiddleware:
    """Gives every request an id (the client's `x-request-id` if sane), echoes it in the response
    headers, and logs one JSON line when the response ends: method, path, status, latency, tokens, and
    for a refused request the reason, which it also hands to `on_rejection` (the metrics)."""

    def __init__(self, app: ASGIApp, on_rejection: Callable[[str], None] = lambda reason: None):
        self.app = app
        self.on_rejection = on_rejection

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _REQUEST_ID_RE.match(request_id):
            request_id = uuid.uuid4().hex
        status = 500  # if the app fails before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            record = {
                "request_id": request_id, "method": scope["method"], "path": scope["path"], "status": status,
                "latency_ms": round((time.monotonic() - start) * 1000, 2),
            }
            state = scope.get("state", {})
            generation = state.get("generation")
            if generation is not None:
                usage = generation.usage()
                record.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
            rejection = state.get(REJECTION_STATE_KEY)
            if rejection is not None and status >= 400:
                record["rejected"] = rejection
                self.on_rejection(rejection)
            access_logger.info(json.dumps(record))


OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/openapi.json"})  # no key needed: no model work


def check_authorization(headers: list[tuple[bytes, bytes]], api_key: bytes) -> str | None:
    """None when the headers hold exactly one `Authorization: Bearer <api_key>` (the scheme in any case,
    RFC 7235), else what is wrong."""
    values = [value for name, value in headers if name.lower() == b"authorization"]
    if not values:
        return "missing API key (send `Authorization: Bearer <key>`)"
    if len(values) > 1:
        return "more than one Authorization header"
    scheme, _, credentials = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return "unsupported authorization scheme (send `Authorization: Bearer <key>`)"
    if not hmac.compare_digest(credentials.strip(), api_key):
        return "invalid API key"
    return None


class ApiKeyMiddleware:
    """When a key is configured, every request but those to OPEN_PATHS needs `Authorization: Bearer
    <key>`, else a 401. It runs before the body is read: an unauthenticated request costs nothing."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key and scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            problem = check_authorization(scope["headers"], self.api_key)
            if problem is not None:
                error = APIError(401, problem, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error.to_response(scope)(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Bodies over `max_body_bytes` get a 413 in the OpenAI error shape. The body is read here, bounded
    (the excess is drained, not kept, so the client sees the answer), and replayed to the app."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = await self._read_body(receive)
        if body is None:
            error = APIError(413, f"request body larger than {self.max_body_bytes} bytes", code="body_too_large")
            return await error.to_response(scope)(scope, receive, send)
        is_replayed = False

        async def replay() -> Message:
            nonlocal is_replayed
            if is_replayed:
                return await receive()  # later calls: disconnect detection
            is_replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size <= self.max_body_bytes:
                chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        return None if size > self.max_body_bytes else b"".join(chunks)
