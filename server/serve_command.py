"""`hexgen serve`: load a deployment, start the HTTP server, then the engine in the background.

Command-line values override the deployment file; without a file the model runs whole on one cpu.
SIGINT/SIGTERM stop accepting connections, let in-flight requests finish (at most server.drain_seconds),
stop the engine's workers and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import sys

import uvicorn
from sse_starlette.sse import AppStatus

from hexcore.config import DeploymentConfig, load_config, parse_config, single_device_config
from hexcore.cluster.head_options import add_head_arguments, given_cluster_fields
from hexcore.model.files import resolve_model_dir

LOG_LEVELS = ("debug", "info", "warning", "error")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a deployment over an OpenAI-compatible HTTP API",
        description="Serve a deployment over an OpenAI-compatible HTTP API (command-line values override --config).",
    )
    parser.add_argument("--config", help="deployment YAML file (default: the model whole on one cpu)")
    parser.add_argument("--model", help="'default' (SmolLM2-135M-Instruct) or an HF model directory")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000; 0: any free port)")
    parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route but /health, "
                                          "/metrics, /version and /openapi.json")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    across = parser.add_argument_group("across hosts (the deployment file's `cluster:`; see `hexgen node`)")
    add_head_arguments(across)
    parser.set_defaults(func=run)


def num_model_layers(model: str) -> int:
    config = json.loads((resolve_model_dir(model) / "config.json").read_text())
    return int(config["num_hidden_layers"])


def deployment_from_args(args: argparse.Namespace) -> DeploymentConfig:
    """The deployment file (or the single-device default) with the command-line overrides applied."""
    if args.config:
        config = load_config(args.config)
    else:
        model = args.model or "default"
        config = single_device_config(model, num_layers=num_model_layers(model))
    raw = config.model_dump()
    if args.model is not None:
        raw["model"] = args.model
    for field, value in (("host", args.host), ("port", args.port), ("api_key", args.api_key)):
        if value is not None:
            raw["server"][field] = value
    raw["cluster"].update(given_cluster_fields(args))
    return parse_config(raw, source=args.config or "command line")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """Bound before the server starts, so port 0 resolves to a real port we can print."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    from hexcore.executor.deployment import resolve

    config = deployment_from_args(args)
    configure_logging(args.log_level)
    deployment = resolve(config)  # checks the layout against the model before anything starts
    sock = bind_socket(config.server.host, config.server.port)
    host, port = sock.getsockname()[:2]
    print(deployment.describe(), flush=True)
    print(f"listening on http://{host}:{port} (OpenAI API at http://{host}:{port}/v1)", flush=True)
    return asyncio.run(_serve(deployment, sock, args.log_level))


async def _serve(deployment, sock: socket.socket, log_level: str) -> int:
    from hexcore.engine.async_engine import AsyncEngine  # heavy imports: only when serving, not for every hexgen command
    from server.app import build_app

    AppStatus.disable_automatic_graceful_drain()  # let streams finish during the drain
    failures: list[str] = []

    def stop_with(what: str):
        def stop(err: BaseException) -> None:
            failures.append(f"{what}: {err}")
            server.should_exit = True
        return stop

    engine = AsyncEngine(deployment, on_fatal=stop_with("the engine stopped"))
    app = build_app(engine, api_key=deployment.config.server.api_key, max_n=deployment.config.server.max_n,
                    on_start_failure=stop_with("the engine failed to start"))
    server = _DrainingServer(uvicorn.Config(
        app, log_level=log_level, log_config=None,  # uvicorn logs through our root handler and format
        access_log=False, timeout_graceful_shutdown=deployment.config.server.drain_seconds, lifespan="on",
    ), stream_cutoff=app.state.hexgen.stream_cutoff)
    await server.serve(sockets=[sock])
    if failures:
        print(f"hexgen serve: error: {failures[0]}", file=sys.stderr)
        return 1
    return 0


class _DrainingServer(uvicorn.Server):
    """SIGINT/SIGTERM only end the serve loop: uvicorn re-raises the signal after its graceful shutdown,
    which would end the process with a signal status instead of 0. Streams still open shortly before
    the drain ends get a final error event and [DONE] (`stream_cutoff`) instead of being cut mid-chunk."""

    def __init__(self, config: uvicorn.Config, stream_cutoff: asyncio.Event):
        super().__init__(config)
        self._stream_cutoff = stream_cutoff

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:  # the first signal: the drain starts
            drain = self.config.timeout_graceful_shutdown
            cutoff = drain - min(2.0, drain / 4)  # leaves time to send the streams' last events
            loop = asyncio.get_running_loop()
            loop.call_soon_threadsafe(loop.call_later, cutoff, self._stream_cutoff.set)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()
