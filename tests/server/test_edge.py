"""The HTTP edge over the fake engine: every value that could reach a worker is checked first (a 400
naming it, and the server keeps serving), lone surrogates are 400s, text too long to fit is refused
without tokenizing, a non-streamed client that leaves is no 500, refusals are counted apart, auth on
every route that does model or tokenizer work, and the OpenAPI schema lists what the routes answer."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time

import httpx
import pytest
from starlette.testclient import TestClient

from hexcore.engine.client import EngineStats
from server.app import build_app
from server.limits import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from tests.server.conftest import serve_in_thread
from tests.server.fake_engine import FakeEngine
from tests.server.test_errors import assert_error

MAX_N = 8
GOOD = {"model": "fake-model", "prompt": "Hello world", "max_tokens": 3, "temperature": 0}
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


def post_json(client, path: str, body, **kwargs) -> httpx.Response:
    """json.dumps escapes lone surrogates (`"\\ud800"`), as a client's JSON encoder would; httpx's own
    encoder would fail on them before sending."""
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return client.post(path, content=json.dumps(body).encode(), headers=headers, **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    return FakeEngine(tokenizer=tiny_tokenizer)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(build_app(engine, max_n=MAX_N)) as client:
        yield client


def assert_still_serving(client) -> None:
    response = post_json(client, "/v1/completions", GOOD)
    assert response.status_code == 200 and response.json()["choices"][0]["text"]
    response = post_json(client, "/v1/chat/completions", CHAT)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]


VOCAB = 400  # the tiny tokenizer's, which the fake engine takes as its vocab_size
BIG = 1_000_000_000

OUT_OF_RANGE = [
    ("/v1/completions", {**GOOD, "stop_token_ids": [BIG], "min_tokens": 1}, "stop_token_ids"),
    ("/v1/completions", {**GOOD, "stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ("/v1/completions", {**GOOD, "stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/completions", {**GOOD, "stop_token_ids": list(range(2000))}, "stop_token_ids"),
    ("/v1/chat/completions", {**CHAT, "stop_token_ids": [BIG], "min_tokens": 1}, "stop_token_ids"),
    ("/v1/completions", {**GOOD, "prompt": [1, 2, VOCAB]}, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [-1]}, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [[1, 2], [3, BIG]]}, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [[1, 2], [3, 2**70]], "echo": True}, "prompt"),
    ("/detokenize", {"tokens": [1, VOCAB]}, "tokens"),
    ("/detokenize", {"tokens": [-3]}, "tokens"),
    ("/v1/completions", {**GOOD, "logit_bias": {str(BIG): 1.0}}, "logit_bias"),
    ("/v1/completions", {**GOOD, "n": MAX_N + 1}, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 1000}, "n"),
    ("/v1/completions", {**GOOD, "n": -1}, "n"),
    ("/v1/completions", {**GOOD, "best_of": BIG}, "best_of"),
    ("/v1/completions", {**GOOD, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {**GOOD, "logprobs": -1}, "logprobs"),
    ("/v1/completions", {**GOOD, "logprobs": BIG, "echo": True}, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": BIG}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/completions", {**GOOD, "seed": 2**64}, "seed"),
    ("/v1/completions", {**GOOD, "seed": -(2**64)}, "seed"),
    ("/v1/completions", {**GOOD, "top_k": -2}, "top_k"),
    ("/v1/completions", {**GOOD, "min_p": 1.5}, "min_p"),
    ("/v1/completions", {**GOOD, "presence_penalty": -3}, "presence_penalty"),
    ("/v1/completions", {**GOOD, "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {**GOOD, "repetition_penalty": float("inf")}, "repetition_penalty"),
    ("/v1/completions", {**GOOD, "temperature": float("nan")}, "temperature"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": BIG}, "max_tokens"),
    ("/v1/completions", {**GOOD, "min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {**GOOD, "min_tokens": 4, "max_tokens": 3}, "min_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": None, "min_tokens": BIG}, "min_tokens"),
    ("/v1/completions", {**GOOD, "stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ("/v1/completions", {**GOOD, "stop": "x" * (MAX_STOP_STRING_CHARS + 1)}, "stop"),
    ("/v1/completions", {**GOOD, "stop": [""]}, "stop"),
]


@pytest.mark.parametrize("path, body, param", OUT_OF_RANGE)
def test_out_of_range_value_is_400_naming_it_and_never_reaches_the_engine(client, engine, path, body, param):
    num_received = len(engine.received)
    error = assert_error(post_json(client, path, body), 400, param)
    assert error["type"] == "invalid_request_error"
    assert len(engine.received) == num_received
    assert_still_serving(client)


def test_in_range_values_are_accepted(client, engine):
    body = {**GOOD, "prompt": [[1, 2], [VOCAB - 1]], "stop_token_ids": [0, VOCAB - 1], "min_tokens": 1,
            "n": MAX_N, "seed": 2**63 - 1, "logprobs": 20, "stop": ["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS}
    response = post_json(client, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2 * MAX_N
    chat = {**CHAT, "logprobs": True, "top_logprobs": 20, "seed": -(2**63), "max_tokens": None, "min_tokens": 100}
    assert post_json(client, "/v1/chat/completions", chat).status_code == 200
    assert post_json(client, "/detokenize", {"tokens": [0, VOCAB - 1]}).status_code == 200


SURROGATES = [
    ("/v1/completions", {**GOOD, "prompt": "Hello \ud800 world"}, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["ok", "\udfff"]}, "prompt.1"),
    ("/v1/completions", {**GOOD, "stop": ["\ud800"]}, "stop.0"),
    ("/v1/completions", {**GOOD, "model": "\ud800"}, "model"),
    ("/v1/completions", {**GOOD, "user": "\ud800"}, "user"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a\ud800"}]}, "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "name": "\ud800"}]}, "messages.0.name"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
    ("/v1/completions", {**GOOD, "\ud800": 1}, None),
]


@pytest.mark.parametrize("path, body, param", SURROGATES)
def test_lone_surrogate_is_400(client, caplog, path, body, param):
    with caplog.at_level(logging.WARNING):
        error = assert_error(post_json(client, path, body), 400)
    assert "Unicode" in error["message"]
    if param is not None:
        assert error["param"] == param
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert_still_serving(client)


def test_valid_non_ascii_text_is_accepted(client):
    assert post_json(client, "/v1/completions", {**GOOD, "prompt": "héllo 😀 \u4e16"}).status_code == 200
    assert post_json(client, "/tokenize", {"prompt": "😀"}).json()["count"] > 0


@pytest.fixture
def tokenizer_calls(engine, monkeypatch):
    calls = []
    encode = engine.tokenizer.encode

    def counting_encode(text, *args, **kwargs):
        calls.append(len(text))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "encode", counting_encode)
    return calls


def test_text_too_long_to_fit_is_400_without_tokenizing(client, engine, tokenizer_calls):
    longest = max(len(token) for token in engine.tokenizer.get_vocab())
    too_long = "x" * (engine.max_model_len * longest + 1)
    for path, body, param in [
        ("/v1/completions", {**GOOD, "prompt": too_long}, "prompt"),
        ("/v1/completions", {**GOOD, "prompt": ["Hi", too_long]}, "prompt"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": too_long}]}, "messages"),
        ("/tokenize", {"prompt": too_long}, "prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": too_long}]}, "messages"),
    ]:
        error = assert_error(post_json(client, path, body), 400, param)
        assert "cannot fit" in error["message"]
    assert all(length <= len(too_long) - 1 for length in tokenizer_calls)  # only "Hi" was tokenized
    assert_still_serving(client)


def test_n_over_the_configured_max_is_400_naming_n(tiny_tokenizer):
    with TestClient(build_app(FakeEngine(tiny_tokenizer), max_n=2)) as client:
        assert post_json(client, "/v1/completions", {**GOOD, "n": 2}).status_code == 200
        error = assert_error(post_json(client, "/v1/completions", {**GOOD, "n": 3}), 400, "n")
        assert "2" in error["message"]
    with TestClient(build_app(FakeEngine(tiny_tokenizer))) as client:  # default: ServerSpec().max_n
        assert_error(post_json(client, "/v1/completions", {**GOOD, "n": 129}), 400, "n")
        assert post_json(client, "/v1/completions", {**GOOD, "n": 128, "max_tokens": 1}).status_code == 200


# ---- a non-streamed client that leaves -----------------------------------------------------------


def test_non_streamed_disconnect_logs_no_500(tiny_tokenizer, caplog):
    engine = FakeEngine(tiny_tokenizer, token_delay=0.02)
    caplog.set_level(logging.INFO)
    with serve_in_thread(engine) as url:
        port = int(url.rsplit(":", 1)[1])
        for path, body in [("/v1/completions", {**GOOD, "max_tokens": 100}),
                           ("/v1/chat/completions", {**CHAT, "max_tokens": 100})]:
            payload = json.dumps(body).encode()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
                deadline = time.monotonic() + 5
                while not engine.running:  # generating: it is now collecting the choices
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                time.sleep(0.05)
            deadline = time.monotonic() + 5
            while engine.running:
                assert time.monotonic() < deadline, "the engine request was not aborted"
                time.sleep(0.01)
        def statuses() -> list[int]:
            records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "hexgen.access"]
            return [record["status"] for record in records if record["path"].startswith("/v1")]

        deadline = time.monotonic() + 5
        while len(statuses()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert httpx.post(f"{url}/v1/completions", json=GOOD).status_code == 200
    assert len(engine.aborted) == 2
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, [record.getMessage() for record in errors]
    assert statuses() == [499, 499, 200]


# ---- auth ------------------------------------------------------------------------------------------

KEY = "sesame"
PROTECTED = [
    ("POST", "/v1/completions", GOOD),
    ("POST", "/v1/chat/completions", CHAT),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/fake-model", None),
    ("POST", "/tokenize", {"prompt": "Hi"}),
    ("POST", "/detokenize", {"tokens": [1, 2]}),
    ("GET", "/tokenizer_info", None),
]
OPEN = [("GET", "/health", None), ("GET", "/metrics", None), ("GET", "/version", None), ("GET", "/openapi.json", None)]


@pytest.fixture(scope="module")
def keyed_client(tiny_tokenizer):
    with TestClient(build_app(FakeEngine(tiny_tokenizer), api_key=KEY)) as client:
        yield client


@pytest.fixture(scope="module")
def open_client(tiny_tokenizer):
    with TestClient(build_app(FakeEngine(tiny_tokenizer))) as client:
        yield client


def call(client, method: str, path: str, body, headers=()) -> httpx.Response:
    return client.request(method, path, json=body, headers=list(headers))


@pytest.mark.parametrize("method, path, body", PROTECTED)
@pytest.mark.parametrize("headers", [
    [], [("Authorization", "Bearer nope")], [("Authorization", f"Basic {KEY}")], [("Authorization", KEY)],
    [("Authorization", "Bearer")], [("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {KEY}")],
    [("Authorization", f"Bearer {KEY}"), ("authorization", "Bearer nope")],
], ids=["none", "wrong-key", "basic", "no-scheme", "empty", "duplicate", "duplicate-mixed"])
def test_protected_route_refuses_without_the_key(keyed_client, method, path, body, headers):
    response = call(keyed_client, method, path, body, headers)
    assert assert_error(response, 401)["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("method, path, body", PROTECTED)
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_protected_route_accepts_the_key_in_any_scheme_case(keyed_client, method, path, body, scheme):
    assert call(keyed_client, method, path, body, [("Authorization", f"{scheme} {KEY}")]).status_code == 200


@pytest.mark.parametrize("method, path, body", OPEN)
def test_open_route_needs_no_key(keyed_client, method, path, body):
    assert call(keyed_client, method, path, body).status_code == 200


@pytest.mark.parametrize("method, path, body", PROTECTED + OPEN)
@pytest.mark.parametrize("headers", [[], [("Authorization", "Bearer ")], [("Authorization", "Bearer anything")]])
def test_without_a_configured_key_every_route_is_open(open_client, method, path, body, headers):
    assert call(open_client, method, path, body, headers).status_code == 200


def test_unknown_route_needs_the_key_too(keyed_client):
    assert_error(call(keyed_client, "GET", "/v2/secret", None), 401)
    assert_error(call(keyed_client, "GET", "/v2/secret", None, [("Authorization", f"Bearer {KEY}")]), 404)


def test_unauthenticated_body_is_refused_before_it_is_parsed(keyed_client, tokenizer_calls):
    response = keyed_client.post("/tokenize", content=b'{"prompt": "' + b"x" * 1_000_000 + b'"}',
                                 headers={"content-type": "application/json"})
    assert_error(response, 401)
    assert not tokenizer_calls


# ---- metrics ---------------------------------------------------------------------------------------


def metric_values(client, name: str) -> dict[str, float]:
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name):].rsplit(" ", 1)
            values[labels] = float(value)
    return values


def test_rejections_are_counted_apart_from_finishes(tiny_tokenizer):
    engine = FakeEngine(tiny_tokenizer, token_delay=0.05, max_num_requests=1)
    with TestClient(build_app(engine, api_key=KEY, max_body_bytes=10_000)) as client:
        auth = {"Authorization": f"Bearer {KEY}"}
        assert_error(post_json(client, "/v1/completions", {**GOOD, "stop_token_ids": [BIG]}, headers=auth), 400)
        assert_error(post_json(client, "/v1/completions", {**GOOD, "prompt": "\ud800"}, headers=auth), 400)
        assert_error(post_json(client, "/v1/completions", GOOD), 401)
        assert_error(post_json(client, "/v1/completions", {**GOOD, "prompt": "x" * 20_000}, headers=auth), 413)
        assert_error(client.get("/v1/models/other", headers=auth), 404)
        engine.running.add("someone-else")  # the fake engine is full: the next request is refused
        assert_error(post_json(client, "/v1/completions", GOOD, headers=auth), 503)
        engine.running.clear()
        assert post_json(client, "/v1/completions", GOOD, headers=auth).status_code == 200
        rejected = metric_values(client, "hexgen_requests_rejected_total")
        finished = metric_values(client, "hexgen_request_success_total")
    assert rejected == {
        '{reason="invalid_request"}': 3.0, '{reason="unauthorized"}': 1.0, '{reason="too_large"}': 1.0,
        '{reason="overloaded"}': 1.0, '{reason="not_ready"}': 0.0, '{reason="unavailable"}': 0.0,
    }
    assert finished == {'{finish_reason="length",replica="r0"}': 1.0}  # no abort, no replica="unknown"


def test_loading_is_counted_as_not_ready(tiny_tokenizer):
    engine = FakeEngine(tiny_tokenizer, startup_seconds=60)
    with TestClient(build_app(engine)) as client:
        assert_error(post_json(client, "/v1/completions", GOOD), 503)
        assert client.get("/health").json() == {"status": "loading"}
        assert metric_values(client, "hexgen_requests_rejected_total")['{reason="not_ready"}'] == 1.0


# ---- health and the OpenAPI schema -----------------------------------------------------------------


def test_health_is_json(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "replicas": {"r0": {"is_up": True, "reason": None}}}
    assert response.headers["content-type"] == "application/json"


def test_with_no_replica_up_health_says_which_are_down_and_why(tiny_tokenizer, monkeypatch):
    engine = FakeEngine(tiny_tokenizer)
    with TestClient(build_app(engine)) as client:
        down = dataclasses.replace(engine.stats().replicas[0], is_up=False, down_reason="rank 0 killed by SIGKILL")
        monkeypatch.setattr(engine, "stats", lambda: EngineStats([down]))
        response = client.get("/health")
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert response.json() == {"status": "unavailable",
                                   "replicas": {"r0": {"is_up": False, "reason": "rank 0 killed by SIGKILL"}}}


def test_openapi_documents_the_errors_and_no_422(client):
    schema = client.get("/openapi.json").json()
    assert "422" not in json.dumps(schema["paths"]) and "HTTPValidationError" not in json.dumps(schema)
    responses = {
        (path, method): set(operation["responses"])
        for path, item in schema["paths"].items() for method, operation in item.items()
    }
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        assert {"200", "400", "401", "413", "503"} <= responses[(path, "post")], path
    assert {"200", "401", "503"} <= responses[("/v1/models", "get")]
    assert {"200", "401", "404", "503"} <= responses[("/v1/models/{model_id}", "get")]
    assert {"200", "401", "503"} <= responses[("/tokenizer_info", "get")]
    health = schema["paths"]["/health"]["get"]["responses"]
    assert set(health) == {"200", "503"} and all("application/json" in r["content"] for r in health.values())
    error = schema["paths"]["/v1/completions"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    request = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert request["n"]["minimum"] == 1 and request["logprobs"]["anyOf"][0]["maximum"] == 20
