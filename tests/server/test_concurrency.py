"""Concurrent streams over the fake engine, and a client that leaves aborts its engine request at once."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.server.conftest import serve_in_thread
from tests.server.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def slow_engine(tiny_tokenizer):
    return FakeEngine(tokenizer=tiny_tokenizer, token_delay=0.01)


@pytest.fixture(scope="module")
def slow_url(slow_engine):
    with serve_in_thread(slow_engine) as url:
        yield url


def wait_until(condition, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_stream_disconnect_aborts_engine_request(slow_url, slow_engine):
    body = {"prompt": "Hello", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{slow_url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line).removeprefix("data: "))
        request_id = first["id"] + "-0"
        assert request_id in slow_engine.running
    left_at = time.monotonic()
    assert wait_until(lambda: request_id in slow_engine.aborted)
    assert time.monotonic() - left_at < 1.0  # at once: well before the 200 tokens would have taken
    assert request_id not in slow_engine.finished


def test_non_streamed_disconnect_aborts_engine_request(slow_url, slow_engine):
    num_aborted = len(slow_engine.aborted)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow_url}/v1/completions", json={"prompt": "Hello", "max_tokens": 200}, timeout=0.3)
    assert wait_until(lambda: len(slow_engine.aborted) > num_aborted)
    assert not slow_engine.running


def test_sixteen_streams_complete_while_a_seventeenth_leaves(slow_url, slow_engine):
    client = openai.AsyncOpenAI(base_url=f"{slow_url}/v1", api_key="x", max_retries=0)
    expected = openai.OpenAI(base_url=f"{slow_url}/v1", api_key="x", max_retries=0).completions.create(
        model="fake-model", prompt="Count", max_tokens=30, temperature=0
    ).choices[0].text

    async def full_stream() -> str:
        stream = await client.completions.create(model="fake-model", prompt="Count", max_tokens=30, temperature=0, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def leaver() -> str:
        stream = await client.completions.create(model="fake-model", prompt="Count", max_tokens=60, stream=True)
        num_chunks = 0
        async for chunk in stream:
            num_chunks += 1
            if num_chunks == 30:  # halfway
                break
        await stream.close()
        return chunk.id + "-0"

    async def main():
        return await asyncio.gather(*(full_stream() for _ in range(16)), leaver())

    *texts, left_id = asyncio.run(main())
    assert texts == [expected] * 16
    assert wait_until(lambda: left_id in slow_engine.aborted)
    assert left_id not in slow_engine.finished


@pytest.mark.parametrize("is_stream", [False, True])
def test_disconnect_before_the_first_token_aborts_engine_request(tiny_tokenizer, is_stream):
    engine = FakeEngine(tiny_tokenizer, first_token_delay=3.0)
    with serve_in_thread(engine) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "stream": is_stream}, timeout=0.3)
        assert wait_until(lambda: len(engine.aborted) == 1, seconds=1.5)  # long before the first token
        assert not engine.running and not engine.finished
