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
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from hexcore.engine.client import EngineClient
from server.errors import APIError, install_error_handlers
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
from server.serving_tokens import TokenizationServing

logger = logging.getLogger("hexgen.server")
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
router = APIRouter()


@dataclass
class ServerState:
    """Runtime objects the routes use (kept on app.state.hexgen)."""

    engine: EngineClient
    metrics: ServerMetrics
    completions: CompletionServing
    chat: ChatServing
    tokens: TokenizationServing
    created: int


def _state(raw_request: Request) -> ServerState:
    return raw_request.app.state.hexgen


def hexgen_version() -> str:
    try:
        return version("hexgen")
    except PackageNotFoundError:
        return "unknown"


@router.post("/v1/completions")
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    return await _state(raw_request).completions.create(request, raw_request)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    return await _state(raw_request).chat.create(request, raw_request)


def _model_card(state: ServerState) -> ModelCard:
    check_ready(state.engine)  # the name and context length are known once the model is loaded
    return ModelCard(id=state.engine.model_name, created=state.created, max_model_len=state.engine.max_model_len)


@router.get("/v1/models")
async def list_models(raw_request: Request) -> dict:
    return ModelList(data=[_model_card(_state(raw_request))]).model_dump()


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, raw_request: Request) -> dict:
    state = _state(raw_request)
    if model_id != state.engine.model_name:
        raise APIError(404, f"model {model_id!r} not found", param="model", code="model_not_found")
    return _model_card(state).model_dump()


@router.get("/health")
async def health(raw_request: Request) -> Response:
    if _state(raw_request).engine.is_ready:
        return Response(status_code=200)
    return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics")
async def metrics(raw_request: Request) -> Response:
    return Response(_state(raw_request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize")
async def tokenize(request: TokenizeRequest, raw_request: Request) -> dict:
    return await _state(raw_request).tokens.tokenize(request)


@router.post("/detokenize")
async def detokenize(request: DetokenizeRequest, raw_request: Request) -> dict:
    return await _state(raw_request).tokens.detokenize(request)


@router.get("/tokenizer_info")
async def tokenizer_info(raw_request: Request) -> dict:
    return _state(raw_request).tokens.tokenizer_info()


@router.get("/version")
async def server_version() -> dict:
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


def build_app(
    engine: EngineClient,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_start_failure: Callable[[BaseException], None] = lambda err: None,
) -> FastAPI:
    """The HTTP app over `engine`. Its lifespan starts the engine in the background and shuts it down."""

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
    app.state.hexgen = ServerState(
        engine=engine,
        metrics=metrics_,
        completions=CompletionServing(engine, metrics_, tokenizer_pool),
        chat=ChatServing(engine, metrics_, tokenizer_pool),
        tokens=TokenizationServing(engine, metrics_, tokenizer_pool),
        created=int(time.time()),
    )
    app.include_router(router)
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _client_gone(request: Request, err: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; the access log records the disconnect

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(AccessLogMiddleware)  # added last: outermost, so it logs guard rejections too
    return app
