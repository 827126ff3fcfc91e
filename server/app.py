"""The FastAPI app: routes, middleware, error handlers, and the engine's lifetime (started in the
background once the HTTP server is up, so /health can answer 503 while the model loads)."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from hexcore.config import ServerSpec
from hexcore.engine.client import EngineClient
from server.errors import APIError, install_error_handlers
from server.limits import EdgeLimits
from server.metrics import ServerMetrics
from server.middleware import AccessLogMiddleware, ApiKeyMiddleware, BodyLimitMiddleware
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from server.serving_chat import ChatServing
from server.serving_common import ClientDisconnected, check_ready
from server.serving_completions import CompletionServing
from server.serving_responses import ResponsesRequest, ResponsesServing
from server.serving_tokens import TokenizationServing

logger = logging.getLogger("hexgen.server")
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
router = APIRouter()


# ---- what the OpenAPI schema says each route can answer (FastAPI's default 422 is never sent) ------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ReplicaHealth(BaseModel):
    is_up: bool
    reason: str | None = None  # why it is down (its last failure), while it is


class HealthStatus(BaseModel):
    status: str  # "ok", "loading" or "unavailable" (no replica up)
    replicas: dict[str, ReplicaHealth] = {}


def _errors(*statuses: int) -> dict:
    descriptions = {
        400: "Invalid request (the `param` field names the offending parameter)",
        401: "Missing or invalid API key (when the server has one)",
        404: "Unknown model",
        413: "Request body too large",
        503: "Model still loading, or server overloaded (see Retry-After)",
    }
    return {status: {"model": ErrorResponse, "description": descriptions[status]} for status in statuses}


_GENERATION_ERRORS = _errors(400, 401, 404, 413, 503)
_TOKENIZER_ERRORS = _errors(400, 401, 413, 503)
_MODEL_ERRORS = _errors(401, 503)
_SSE = {200: {"content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}},
              "description": "The response, or with `stream: true` server-sent events (`data: <json>`, then `data: [DONE]`)"}}


@dataclass
class ServerState:
    """Runtime objects the routes use (kept on app.state.hexgen)."""

    engine: EngineClient
    metrics: ServerMetrics
    completions: CompletionServing
    chat: ChatServing
    tokens: TokenizationServing
    created: int
    stream_cutoff: asyncio.Event  # set at the end of a shutdown's drain: open streams end with an error
    responses: ResponsesServing | None = None


def _state(raw_request: Request) -> ServerState:
    return raw_request.app.state.hexgen


def hexgen_version() -> str:
    try:
        return version("hexgen")
    except PackageNotFoundError:
        return "unknown"


@router.post("/v1/completions", responses={**_SSE, **_GENERATION_ERRORS})
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    return await _state(raw_request).completions.create(request, raw_request)


@router.post("/v1/chat/completions", responses={**_SSE, **_GENERATION_ERRORS})
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    return await _state(raw_request).chat.create(request, raw_request)


@router.post("/v1/responses", responses={**_SSE, **_GENERATION_ERRORS})
async def create_response(request: ResponsesRequest, raw_request: Request) -> Response:
    return await _state(raw_request).responses.create(request, raw_request)


def _model_card(state: ServerState) -> ModelCard:
    check_ready(state.engine)  # the name and context length are known once the model is loaded
    return ModelCard(id=state.engine.model_name, created=state.created, max_model_len=state.engine.max_model_len)


@router.get("/v1/models", response_model=ModelList, responses=_MODEL_ERRORS)
async def list_models(raw_request: Request) -> dict:
    return ModelList(data=[_model_card(_state(raw_request))]).model_dump()


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={**_MODEL_ERRORS, **_errors(404)})
async def retrieve_model(model_id: str, raw_request: Request) -> dict:
    state = _state(raw_request)
    if model_id != state.engine.model_name:
        raise APIError(404, f"model {model_id!r} not found", param="model", code="model_not_found")
    return _model_card(state).model_dump()


@router.get(
    "/health", response_model=HealthStatus,
    responses={200: {"description": "Serving: at least one replica is up"},
               503: {"model": HealthStatus, "description": "Loading, or no replica up (see `replicas`)"}},
)
async def health(raw_request: Request) -> Response:
    """Open even with an API key. 200 `{"status": "ok", "replicas": {...}}` while a replica is up; 503
    with Retry-After while the model loads (`loading`) or while every replica is down and restarting
    (`unavailable`, each replica with the reason it is down)."""
    engine = _state(raw_request).engine
    if not engine.is_ready:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    replicas = {r.name: ReplicaHealth(is_up=r.is_up, reason=r.down_reason) for r in engine.stats().replicas}
    is_up = any(r.is_up for r in replicas.values()) or not replicas
    body = HealthStatus(status="ok" if is_up else "unavailable", replicas=replicas).model_dump()
    return JSONResponse(body, status_code=200 if is_up else 503, headers={} if is_up else {"Retry-After": "5"})


@router.get(
    "/metrics", response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}, "description": "Prometheus text"}},
)
async def metrics(raw_request: Request) -> Response:
    """Open even with an API key."""
    return Response(_state(raw_request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize", responses=_TOKENIZER_ERRORS)
async def tokenize(request: TokenizeRequest, raw_request: Request) -> dict:
    return await _state(raw_request).tokens.tokenize(request)


@router.post("/detokenize", responses=_TOKENIZER_ERRORS)
async def detokenize(request: DetokenizeRequest, raw_request: Request) -> dict:
    return await _state(raw_request).tokens.detokenize(request)


@router.get("/tokenizer_info", responses=_MODEL_ERRORS)
async def tokenizer_info(raw_request: Request) -> dict:
    return _state(raw_request).tokens.tokenizer_info()


@router.get("/version")
async def server_version() -> dict:
    """Open even with an API key."""
    return {"version": hexgen_version()}


async def _start_engine(engine: EngineClient, on_start_failure: Callable[[BaseException], None]) -> None:
    started = time.monotonic()
    try:
        await engine.start()
    except Exception as err:
        logger.exception("the engine failed to start")
        on_start_failure(err)
        return
    logger.info("engine ready after %.1f s", time.monotonic() - started)


def _openapi_without_422(app: FastAPI) -> Callable[[], dict]:
    """FastAPI documents a 422 on every route with parameters; validation errors are 400s here (in
    the OpenAI error shape), as each route's responses say."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi



def build_app(
    engine: EngineClient,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_start_failure: Callable[[BaseException], None] = lambda err: None,
    max_n: int = ServerSpec().max_n,
) -> FastAPI:
    """The HTTP app over `engine`. Its lifespan starts the engine in the background and shuts it down.
    `max_n` (the deployment's server.max_n) bounds the choices one request may ask for."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        starting = asyncio.create_task(_start_engine(engine, on_start_failure))
        try:
            yield
        finally:
            starting.cancel()
            await engine.shutdown()
            tokenizer_pool.shutdown(wait=False)

    app = FastAPI(title="hexgen", version=hexgen_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    metrics_ = ServerMetrics(engine)
    tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hexgen-tokenizer")
    limits = EdgeLimits(engine, max_n=max_n)
    cutoff = asyncio.Event()
    app.state.hexgen = ServerState(
        engine=engine,
        metrics=metrics_,
        completions=CompletionServing(engine, metrics_, tokenizer_pool, limits, cutoff),
        chat=ChatServing(engine, metrics_, tokenizer_pool, limits, cutoff),
        tokens=TokenizationServing(engine, metrics_, tokenizer_pool, limits, cutoff),
        created=int(time.time()),
        stream_cutoff=cutoff,
        responses=ResponsesServing(engine, metrics_, tokenizer_pool, limits, cutoff),
    )
    app.include_router(router)
    app.openapi = _openapi_without_422(app)
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _client_gone(request: Request, err: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; the access log records the disconnect

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    # added last: outermost, so it logs and counts the guards' rejections too
    app.add_middleware(AccessLogMiddleware, on_rejection=metrics_.count_rejection)
    return app
