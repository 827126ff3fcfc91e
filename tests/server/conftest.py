"""Fixtures: the HTTP app over a FakeEngine, served by uvicorn in a background thread on a free port."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import pytest
import uvicorn

from hexcore.executor.ports import free_port
from server.app import build_app
from tests.conftest import build_tokenizer
from tests.server.fake_engine import FakeEngine


@contextlib.contextmanager
def serve_in_thread(engine, wait_ready: bool = True, **app_options):
    """Yield the base URL of the app over `engine`, served until the block ends."""
    port = free_port()
    config = uvicorn.Config(build_app(engine, **app_options), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    while wait_ready and httpx.get(f"{base_url}/health").status_code != 200:
        assert time.monotonic() < deadline, "engine did not become ready"
        time.sleep(0.01)
    try:
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def fake_engine(tiny_tokenizer):
    return FakeEngine(tokenizer=tiny_tokenizer, token_delay=0.002)


@pytest.fixture(scope="module")
def base_url(fake_engine):
    with serve_in_thread(fake_engine) as url:
        yield url
