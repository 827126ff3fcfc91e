"""Property-based fuzzing of the request schemas (hypothesis) against the app over the fake engine,
in process: valid-ish and garbage bodies (wrong types, huge and negative numbers, NaN, lone
surrogates, nested junk, unknown keys, non-JSON) for every route that takes a body. No input may
yield a 5xx (nor a server error inside a stream), and a normal request succeeds afterwards."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from server.app import build_app
from server.protocol import find_invalid_unicode
from tests.server.fake_engine import FakeEngine

MAX_N = 4
VOCAB = 400  # the tiny tokenizer's

# ---- building blocks -------------------------------------------------------------------------------

text_piece = st.one_of(
    st.characters(exclude_categories=()),  # lone surrogates included
    st.sampled_from(["\ud800", "\udfff", "\x00", "\n", " ", "é", "😀", "<|im_start|>", "<|im_end|>", "{{", "{%"]),
)
text = st.lists(text_piece, max_size=20).map("".join)
huge_ints = st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30), BIG := 1_000_000_000])
ints = st.one_of(st.integers(-3, VOCAB + 3), huge_ints, st.integers())
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, text)
junk = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(text, children, max_size=4)),
    max_leaves=12,
)
valid_char = st.one_of(
    st.characters(),  # no lone surrogates
    st.sampled_from(["\n", " ", "é", "😀", "<|im_start|>", "<|im_end|>", "{{", "{%"]),
)
valid_text = st.lists(valid_char, min_size=1, max_size=12).map("".join)
valid_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)

# ---- what each route serves (a body made of these alone is served), then mutated ----------------

message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"])},
    optional={
        "content": st.one_of(valid_text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": valid_text}),
                                                  min_size=1, max_size=2)),
        "name": valid_text,
    },
)
user_message = st.fixed_dictionaries({"role": st.just("user"), "content": valid_text})
messages = st.tuples(st.lists(message, max_size=2), user_message).map(lambda pair: [*pair[0], pair[1]])
SAMPLING = {
    "model": st.just("fake-model"),
    "max_tokens": st.integers(1, 8),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "n": st.integers(1, MAX_N),
    "stop": st.one_of(valid_text, st.lists(valid_text, max_size=3)),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stream": st.booleans(),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "user": valid_text,
    "logit_bias": st.just({}),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.1, 2),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=4),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 1),
    "skip_special_tokens": st.booleans(),
}
COMPLETION = {
    **SAMPLING,
    "prompt": st.one_of(valid_text, st.lists(valid_text, min_size=1, max_size=3), valid_ids,
                        st.lists(valid_ids, min_size=1, max_size=3)),
    "echo": st.booleans(),
    "logprobs": st.integers(0, 20),
}
CHAT = {
    **SAMPLING,
    "messages": messages,
    "max_completion_tokens": st.integers(1, 8),
    "logprobs": st.just(True),
    "top_logprobs": st.integers(0, 20),
    "response_format": st.just({"type": "text"}),
    "add_generation_prompt": st.booleans(),
}
REQUIRED = {
    "/v1/completions": {"prompt": COMPLETION["prompt"]},
    "/v1/chat/completions": {"messages": messages},
    "/tokenize": {"prompt": valid_text},
    "/detokenize": {"tokens": valid_ids},
}
OPTIONAL = {
    "/v1/completions": {key: value for key, value in COMPLETION.items() if key != "prompt"},
    "/v1/chat/completions": {key: value for key, value in CHAT.items() if key != "messages"},
    "/tokenize": {"model": st.just("fake-model"), "add_special_tokens": st.booleans(),
                  "add_generation_prompt": st.booleans()},
    "/detokenize": {"model": st.just("fake-model")},
}
bad_id = st.sampled_from([-1, VOCAB, VOCAB + 1, BIG, 2**63, 2**64, -(2**64)])
bad_ids = st.lists(st.one_of(st.integers(0, VOCAB - 1), bad_id), min_size=1, max_size=4).map(
    lambda ids: [*ids, -1] if all(0 <= token_id < VOCAB for token_id in ids) else ids)
bad_int = st.one_of(huge_ints, st.integers(-5, 0), st.integers(MAX_N + 1, 300))
bad_float = st.sampled_from([float("nan"), float("inf"), float("-inf"), -1.0, -2.5, 2.5, 1e308, 0.0])
bad_text = st.one_of(
    st.lists(text_piece, min_size=1, max_size=8).map(lambda pieces: "".join(pieces) + "\ud800"),
    st.sampled_from(["", "x" * 300, "y" * 5000]),
)
bad_message = st.one_of(
    st.fixed_dictionaries({"role": st.just("user"), "content": bad_text}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.just([{"type": "text", "text": "\ud800"}])}),
    st.fixed_dictionaries({"role": st.sampled_from(["tool", "", "\ud800"]), "content": valid_text}),
)
BAD = {  # out-of-range values of each kind, per field
    **{field: bad_int for field in ("max_tokens", "n", "seed", "top_k", "min_tokens", "logprobs", "top_logprobs",
                                     "max_completion_tokens", "best_of")},
    **{field: bad_float for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p",
                                       "repetition_penalty")},
    **{field: bad_text for field in ("model", "user")},
    "stop": st.one_of(bad_text, st.lists(bad_text, min_size=1, max_size=2), st.lists(valid_text, min_size=17, max_size=20)),
    "stop_token_ids": bad_ids,
    "tokens": bad_ids,
    "logit_bias": st.dictionaries(st.one_of(bad_id.map(str), bad_text), bad_float, min_size=1, max_size=2),
    "prompt": st.one_of(bad_text, st.lists(bad_text, min_size=1, max_size=2), bad_ids, st.lists(bad_ids, min_size=1, max_size=2)),
    "messages": st.tuples(messages, bad_message).map(lambda pair: [*pair[0], pair[1]]),
}
def served_bodies(route: str) -> st.SearchStrategy:
    """Bodies the route serves (a 200): required fields, some optional ones."""
    bodies = st.fixed_dictionaries(REQUIRED[route], optional=OPTIONAL[route])
    return bodies.map(lambda body: {**body, "logprobs": True} if "top_logprobs" in body else body)


unknown_field = st.sampled_from(["suffix", "tools", "functions", "stream_options", "echo", "prompt", "messages", "tokens"])
MUTATIONS = [(route, field) for route in sorted(REQUIRED) for field in sorted({*REQUIRED[route], *OPTIONAL[route]} & set(BAD))]


def junk_bodies(route: str) -> st.SearchStrategy:
    """Anything at the top, or the route's keys with junk values."""
    keys = sorted({*REQUIRED[route], *OPTIONAL[route]})
    return st.one_of(junk, st.dictionaries(st.sampled_from(keys), junk, max_size=6))


raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b'{"prompt": "\\ud800"}', b'{"prompt": "\xed\xa0\x80"}', b"[" * 5000 + b"]" * 5000,
                     b'{"n": ' + b"9" * 5000 + b"}", b'{"prompt": NaN}', b"null"]),
)


class StrictFakeEngine(FakeEngine):
    """The fake engine, failing (a 500) on anything that would index past a real worker's tensors or
    that the edge promises never to let through."""

    def generate(self, request_id, prompt_token_ids, params):
        problems = [
            not all(0 <= token_id < self.vocab_size for token_id in prompt_token_ids),
            not all(0 <= token_id < self.vocab_size for token_id in params.stop_token_ids),
            not 1 <= params.n <= MAX_N,
            params.min_tokens >= self.max_model_len,
            params.seed is not None and not -(2**63) <= params.seed < 2**63,
            not all(math.isfinite(value) for value in (params.temperature, params.top_p, params.min_p,
                    params.presence_penalty, params.frequency_penalty, params.repetition_penalty)),
            any(find_invalid_unicode(stop) is not None for stop in params.stop),
        ]
        if any(problems):
            raise RuntimeError(f"the edge let through {prompt_token_ids} {params}: {problems}")
        return super().generate(request_id, prompt_token_ids, params)


@pytest.fixture(scope="module")
def client(tiny_tokenizer):
    engine = StrictFakeEngine(tokenizer=tiny_tokenizer, max_model_len=256)
    with TestClient(build_app(engine, max_n=MAX_N), raise_server_exceptions=False) as client:
        yield client


def assert_no_server_error(response) -> None:
    assert response.status_code < 500, response.text
    assert '"server_error"' not in response.text, response.text  # nor as an event inside a stream


FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True,  # the same examples on every run
                suppress_health_check=[HealthCheck.too_slow])
ROUTES = sorted(REQUIRED)


def post_body(client, route: str, body) -> None:
    response = client.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert_no_server_error(response)
    event(f"{route} {response.status_code}")  # --hypothesis-show-statistics: how many got through


@settings(FUZZ, max_examples=50)
@given(route=st.sampled_from(ROUTES), data=st.data())
def test_valid_bodies_are_served(client, route, data):
    body = data.draw(served_bodies(route), label="body")
    response = client.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert_no_server_error(response)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("route, field", MUTATIONS, ids=[f"{route}:{field}" for route, field in MUTATIONS])
@settings(FUZZ, max_examples=4)
@given(data=st.data())
def test_an_out_of_range_field_yields_no_server_error(client, route, field, data):
    """A served body with one field out of range (every field, every route: ~4 examples each), and
    sometimes a junk field besides."""
    body = data.draw(served_bodies(route), label="body")
    body[field] = data.draw(BAD[field], label=field)
    if data.draw(st.sampled_from([False, False, True]), label="more junk"):
        body[data.draw(st.one_of(unknown_field, text), label="junk field")] = data.draw(junk, label="junk")
    post_body(client, route, body)


@settings(FUZZ, max_examples=60)
@given(route=st.sampled_from(ROUTES), data=st.data())
def test_no_junk_body_yields_a_server_error(client, route, data):
    post_body(client, route, data.draw(junk_bodies(route), label="body"))


@settings(FUZZ, max_examples=40)
@given(route=st.sampled_from(ROUTES), body=raw_bodies,
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_no_raw_body_yields_a_server_error(client, route, body, content_type):
    response = client.post(route, content=body, headers={"content-type": content_type} if content_type else {})
    assert_no_server_error(response)


def test_a_normal_request_succeeds_after_the_fuzzing(client):
    response = client.post("/v1/completions", json={"model": "fake-model", "prompt": "Hello", "max_tokens": 3})
    assert response.status_code == 200 and response.json()["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
