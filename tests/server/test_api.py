"""The HTTP layer over the fake engine: shapes, parameters, streaming, usage, tokenizer endpoints."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from tests.server.fake_engine import SENTENCE


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def sse_events(response: httpx.Response) -> list[str]:
    """The data of each event, checking the framing: only `data: ` lines, each event ended by a blank line."""
    body = response.read().decode()
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    return [event[len("data: "):] for event in events]


def test_completion_non_streamed(client, tiny_tokenizer, fake_engine):
    response = client.completions.create(model="fake-model", prompt="Hello world", max_tokens=5, temperature=0)
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    choice = response.choices[0]
    assert choice.finish_reason == "length" and choice.index == 0
    assert choice.text and choice.text in SENTENCE * 3
    assert response.usage.prompt_tokens == len(tiny_tokenizer.encode("Hello world"))
    assert response.usage.completion_tokens == 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + 5


def test_completion_default_max_tokens_is_16(client):
    response = client.completions.create(model="fake-model", prompt="Hello", temperature=0)
    assert response.usage.completion_tokens == 16


def test_completion_raw_sse_framing(base_url):
    body = {"model": "fake-model", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    for chunk in chunks:
        assert set(chunk) == {"id", "object", "created", "model", "choices"}
        assert chunk["object"] == "text_completion" and len(chunk["choices"]) == 1
        assert set(chunk["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert len({c["id"] for c in chunks}) == 1


def test_chat_raw_sse_role_chunk_first_and_usage_chunk(base_url, tiny_tokenizer):
    body = {
        "model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "n": 2,
        "stream": True, "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = chunks[2:-1]
    assert all(len(c["choices"]) == 1 and "usage" not in c for c in content)
    for index in (0, 1):
        mine = [c["choices"][0] for c in content if c["choices"][0]["index"] == index]
        assert [c["finish_reason"] for c in mine][-1] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])
    usage = chunks[-1]
    assert usage["choices"] == []
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    num_prompt = len(tiny_tokenizer.encode(prompt, add_special_tokens=False))
    assert usage["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": 6, "total_tokens": num_prompt + 6,
                              "prompt_tokens_details": {"cached_tokens": 0}}


def test_no_usage_chunk_unless_asked(client):
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True
    )
    chunks = list(stream)
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)


def test_continuous_usage_stats(base_url):
    body = {
        "prompt": "Hi", "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body) as response:
        chunks = [json.loads(event) for event in sse_events(response)[:-1]]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 3, 3]


def test_streamed_text_equals_non_streamed_for_greedy(client):
    kwargs = dict(model="fake-model", messages=[{"role": "user", "content": "Count"}], max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(**kwargs, stream=True))
    assert streamed == whole and whole


def test_n_choices_and_seed_reproducibility(client):
    kwargs = dict(model="fake-model", prompt="Hello", max_tokens=8, n=3, temperature=1.0, seed=7)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1


def test_stop_string_ends_the_choice(client):
    response = client.completions.create(model="fake-model", prompt="Hello", max_tokens=40, temperature=0, stop=["fox"])
    assert response.choices[0].finish_reason == "stop"
    assert "fox" not in response.choices[0].text


def test_multiple_prompts_number_choices_per_prompt(client):
    response = client.completions.create(model="fake-model", prompt=["Hello", "Count"], max_tokens=2, n=2, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text == response.choices[1].text


def test_sampling_parameters_reach_the_engine(base_url, fake_engine):
    body = {
        "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 7, "min_p": 0.1,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "stop": "x", "stop_token_ids": [9],
        "ignore_eos": True, "min_tokens": 2, "seed": 3, "user": "someone",
    }
    response = httpx.post(f"{base_url}/v1/completions", json=body)
    assert response.status_code == 200
    prompt, params = fake_engine.received[response.json()["id"] + "-0"]
    assert prompt == [1, 2, 3]
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.seed) == (0.5, 0.9, 7, 0.1, 3)
    assert (params.presence_penalty, params.frequency_penalty, params.stop, params.stop_token_ids) == (0.5, -0.5, ("x",), (9,))
    assert params.ignore_eos and params.min_tokens == 2 and params.max_tokens == 5


def test_max_completion_tokens(client):
    response = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_completion_tokens=4,
    )
    assert response.usage.completion_tokens == 4 and response.choices[0].finish_reason == "length"
    assert response.id.startswith("chatcmpl-") and response.choices[0].message.role == "assistant"


def test_echo_logprobs_scores_the_prompt(client):
    prompt = [5, 6, 7, 8]
    response = client.completions.create(model="fake-model", prompt=[prompt], echo=True, logprobs=1, max_tokens=1)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(prompt) + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(isinstance(value, float) for value in logprobs.token_logprobs[1:])
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    assert response.choices[0].text.startswith("".join(logprobs.tokens[:4]))


def test_completion_logprobs_streamed(base_url):
    body = {"prompt": "Hi", "max_tokens": 3, "logprobs": 2, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body) as response:
        chunks = [json.loads(event) for event in sse_events(response)[:-1]]
    logprobs = [c["choices"][0]["logprobs"] for c in chunks]
    assert sum(len(lp["tokens"]) for lp in logprobs) == 3
    assert all(len(top) >= 2 for lp in logprobs for top in lp["top_logprobs"])


def test_chat_logprobs(client):
    response = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(entry.top_logprobs) == 2 and entry.bytes == list(entry.token.encode()) for entry in content)
    assert "".join(entry.token for entry in content) == response.choices[0].message.content


def test_models(client, base_url):
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert client.models.retrieve("fake-model").id == "fake-model"
    response = httpx.get(f"{base_url}/v1/models/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_tokenize_detokenize_tokenizer_info(base_url, tiny_tokenizer):
    tokens = httpx.post(f"{base_url}/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert tokens == {
        "tokens": tiny_tokenizer.encode("Hello world", add_special_tokens=False), "count": len(tokens["tokens"]),
        "max_model_len": 256,
    }
    text = httpx.post(f"{base_url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": "Hello world"}
    chat = httpx.post(f"{base_url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"][0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    info = httpx.get(f"{base_url}/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["max_model_len"] == 256 and info["chat_template"]
    assert httpx.post(f"{base_url}/detokenize", json={"tokens": [10**6]}).status_code == 400


def test_version_health_and_request_id(base_url):
    response = httpx.get(f"{base_url}/version", headers={"x-request-id": "my-id-1"})
    assert response.json()["version"] and response.headers["x-request-id"] == "my-id-1"
    health = httpx.get(f"{base_url}/health")
    assert health.status_code == 200 and len(health.headers["x-request-id"]) == 32


def test_metrics_after_requests(base_url, client):
    client.completions.create(model="fake-model", prompt="Hello", max_tokens=3)
    text = httpx.get(f"{base_url}/metrics").text
    for line in (
        'hexgen_request_success_total{finish_reason="length",replica="r0"}',
        'hexgen_prompt_tokens_total{replica="r0"}', 'hexgen_generation_tokens_total{replica="r0"}',
        'hexgen_time_to_first_token_seconds_count{replica="r0"}', 'hexgen_time_per_output_token_seconds_count{replica="r0"}',
        'hexgen_e2e_request_latency_seconds_count{replica="r0"}', 'hexgen_num_requests_running{replica="r0"}',
        'hexgen_num_requests_waiting{replica="r0"}', 'hexgen_kv_cache_usage_ratio{replica="r0"}',
        'hexgen_stage_busy_ratio{replica="r0",stage="1"} 0.25',
    ):
        assert line in text, line


def test_empty_bearer_accepted_without_api_key(base_url):
    """httpx refuses to send `Bearer ` with nothing after it, so speak HTTP/1.1 by hand."""
    host, port = base_url.removeprefix("http://").split(":")
    body = b'{"prompt": "Hi", "max_tokens": 1}'
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]


def test_structured_access_log(base_url, caplog):
    with caplog.at_level("INFO", logger="hexgen.access"):
        response = httpx.post(f"{base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                              headers={"x-request-id": "trace-42"})
        deadline = time.monotonic() + 2
        while not any("trace-42" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert response.headers["x-request-id"] == "trace-42"
    record = next(json.loads(r.getMessage()) for r in caplog.records if "trace-42" in r.getMessage())
    assert record["method"] == "POST" and record["path"] == "/v1/completions" and record["status"] == 200
    assert record["latency_ms"] > 0 and record["completion_tokens"] == 3 and record["prompt_tokens"] >= 1


def test_null_parameters_mean_not_set(base_url):
    body = {"prompt": "Hi", "temperature": None, "top_p": None, "n": None, "stop": None, "seed": None, "max_tokens": None}
    response = httpx.post(f"{base_url}/v1/completions", json=body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 16
