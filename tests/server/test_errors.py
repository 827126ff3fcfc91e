"""Every error answers in the OpenAI shape with the right status, and the server keeps serving after it."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.server.conftest import serve_in_thread
from tests.server.fake_engine import FAIL_MID_STREAM, FakeEngine

GOOD = {"model": "fake-model", "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_still_serving(base_url: str) -> None:
    response = httpx.post(f"{base_url}/v1/completions", json=GOOD)
    assert response.status_code == 200 and response.json()["choices"][0]["text"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {**GOOD, "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {**GOOD, "temperature": 2.5}, "temperature"),
    ("/v1/completions", {**GOOD, "top_p": 0}, "top_p"),
    ("/v1/completions", {**GOOD, "top_p": 1.5}, "top_p"),
    ("/v1/completions", {**GOOD, "n": 0}, "n"),
    ("/v1/completions", {**GOOD, "prompt": "Hello " * 300}, "prompt"),
    ("/v1/completions", {**GOOD, "max_tokens": 300}, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {**GOOD, "prompt": [[1, 2, 99999]]}, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": []}, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [[1, "x"]]}, "prompt"),  # not "prompt.str": no union member names
    ("/v1/completions", {**GOOD, "stop": [1]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/v1/completions", {**GOOD, "suffix": "x"}, "suffix"),
    ("/v1/completions", {**GOOD, "best_of": 3}, "best_of"),
    ("/v1/completions", {**GOOD, "logit_bias": {"5": 101.0}}, "logit_bias"),
    ("/v1/completions", {**GOOD, "logit_bias": {"five": 1.0}}, "logit_bias"),
    ("/v1/completions", {**GOOD, "store": True}, "store"),
    ("/v1/completions", {**GOOD, "metadata": {"k": 1}}, "metadata.k"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**GOOD, "guided_regex": "[a-z"}, "guided_regex"),
    ("/v1/completions", {**GOOD, "guided_choice": []}, "guided_choice"),
    ("/v1/completions", {**GOOD, "guided_json": {"type": "strin"}}, "guided_json"),
    ("/v1/completions", {**GOOD, "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ("/v1/completions", {**GOOD, "structured_outputs": {"regex": "(a"}}, "structured_outputs.regex"),
    ("/v1/completions", {**GOOD, "structured_outputs": {"grammar": "start: foo"}}, "structured_outputs.grammar"),
    ("/v1/completions", {**GOOD, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"model": "fake-model"}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f g"}}]},
     "tools.0.function.name"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}}], "tool_choice": "required"},
     "tools"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "[a-"}}}}, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "Hello " * 300}]}, "messages"),
])
def test_invalid_request_is_400_naming_the_parameter(base_url, path, body, param):
    error = assert_error(httpx.post(f"{base_url}{path}", json=body), 400, param)
    assert error["type"] == "invalid_request_error"
    assert_still_serving(base_url)


def test_malformed_json_is_400(base_url):
    response = httpx.post(f"{base_url}/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert "JSON" in assert_error(response, 400)["message"]
    assert_still_serving(base_url)


def test_unknown_route_is_404(base_url):
    assert_error(httpx.post(f"{base_url}/v1/engines", json={}), 404)
    assert_still_serving(base_url)


def test_chat_without_template_is_400(base_url, fake_engine):
    template, fake_engine.tokenizer.chat_template = fake_engine.tokenizer.chat_template, None
    try:
        error = assert_error(httpx.post(f"{base_url}/v1/chat/completions", json=CHAT), 400, "messages")
    finally:
        fake_engine.tokenizer.chat_template = template
    assert "chat template" in error["message"]


def test_error_after_stream_started_is_an_error_event_then_done(base_url):
    body = {**GOOD, "prompt": FAIL_MID_STREAM, "max_tokens": 10, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = response.read().decode().strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "simulated" not in error["message"]  # details only in the log
    assert_still_serving(base_url)


def test_internal_fault_before_stream_is_generic_500(base_url):
    response = httpx.post(f"{base_url}/v1/completions", json={**GOOD, "prompt": FAIL_MID_STREAM, "max_tokens": 10})
    assert assert_error(response, 500)["code"] == "internal_error"
    assert_still_serving(base_url)


def test_body_too_large_is_413(tiny_tokenizer):
    with serve_in_thread(FakeEngine(tiny_tokenizer), max_body_bytes=1000) as url:
        assert_error(httpx.post(f"{url}/v1/completions", json={**GOOD, "prompt": "x" * 5000}), 413)
        assert_still_serving(url)


def test_overloaded_is_503_with_retry_after(tiny_tokenizer):
    engine = FakeEngine(tiny_tokenizer, token_delay=0.05, max_num_requests=1)
    with serve_in_thread(engine) as url, httpx.Client(timeout=10) as client:
        body = {**GOOD, "max_tokens": 20, "stream": True}
        with client.stream("POST", f"{url}/v1/completions", json=body) as busy:
            assert busy.status_code == 200
            response = httpx.post(f"{url}/v1/completions", json=GOOD)
            assert assert_error(response, 503)["code"] == "server_overloaded"
            assert response.headers["retry-after"] == "2"
            busy.read()
        assert_still_serving(url)


def test_api_key_required_on_v1_when_configured(tiny_tokenizer):
    with serve_in_thread(FakeEngine(tiny_tokenizer), api_key="sesame") as url:
        assert_error(httpx.post(f"{url}/v1/completions", json=GOOD), 401)
        wrong = httpx.post(f"{url}/v1/completions", json=GOOD, headers={"Authorization": "Bearer nope"})
        assert assert_error(wrong, 401)["type"] == "authentication_error"
        right = httpx.post(f"{url}/v1/completions", json=GOOD, headers={"Authorization": "Bearer sesame"})
        assert right.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200


def test_health_is_503_until_the_engine_is_ready(tiny_tokenizer):
    engine = FakeEngine(tiny_tokenizer, startup_seconds=3.0)  # long enough for four requests on a loaded machine
    with serve_in_thread(engine, wait_ready=False) as url:
        assert httpx.get(f"{url}/health").status_code == 503
        assert_error(httpx.post(f"{url}/v1/completions", json=GOOD), 503)
        assert_error(httpx.post(f"{url}/tokenize", json={"prompt": "Hi"}), 503)
        assert_error(httpx.get(f"{url}/v1/models"), 503)
        while httpx.get(f"{url}/health").status_code != 200:
            time.sleep(0.02)
        assert_still_serving(url)
    assert engine.is_shut_down
