"""What today's OpenAI clients send, over the fake engine: structured-output parameters reach the engine
as one grammar spec, logit_bias / metadata / store, cached_tokens in usage, 404 for an unknown model,
max_tokens 0 with echo scores the prompt."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from hexcore.grammar import json_schema_spec
from hexcore.sampling_params import GrammarSpec

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["b"]}


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")


def last_params(fake_engine):
    return list(fake_engine.received.values())[-1][1]


@pytest.mark.parametrize("fields, expected", [
    ({"response_format": {"type": "json_object"}}, GrammarSpec("json_object")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     json_schema_spec({**SCHEMA, "additionalProperties": False})),  # strict closes objects
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
     json_schema_spec(SCHEMA)),
    ({"response_format": {"type": "text"}}, None),
    ({"guided_json": SCHEMA}, json_schema_spec(SCHEMA)),
    ({"guided_json": json.dumps(SCHEMA)}, json_schema_spec(SCHEMA)),
    ({"guided_regex": "[ab]+"}, GrammarSpec("regex", "[ab]+")),
    ({"guided_choice": ["yes", "no"]}, GrammarSpec("choice", '["yes", "no"]')),
    ({"guided_grammar": 'start: "x"'}, GrammarSpec("lark", 'start: "x"')),
    ({"structured_outputs": {"json": SCHEMA}}, json_schema_spec(SCHEMA)),
    ({"structured_outputs": {"choice": ["a"]}}, GrammarSpec("choice", '["a"]')),
    ({"structured_outputs": {"json_object": True}}, GrammarSpec("json_object")),
])
def test_structured_output_parameters_reach_the_engine_as_one_grammar(base_url, fake_engine, fields, expected):
    response = httpx.post(f"{base_url}/v1/chat/completions", json={**CHAT, **fields})
    assert response.status_code == 200, response.text
    assert last_params(fake_engine).grammar == expected


def test_schema_keeps_its_property_order():
    assert json.loads(json_schema_spec(SCHEMA).source)["properties"].keys() == SCHEMA["properties"].keys()


def test_completions_take_guided_parameters(base_url, fake_engine):
    body = {"model": "fake-model", "prompt": "Hi", "max_tokens": 2, "guided_regex": r"\d+"}
    assert httpx.post(f"{base_url}/v1/completions", json=body).status_code == 200
    assert last_params(fake_engine).grammar == GrammarSpec("regex", r"\d+")


def test_openai_client_parameters_clients_send(client, fake_engine):
    response = client.chat.completions.create(
        **CHAT, logit_bias={"5": -100, "7": 2.5}, metadata={"team": "eval"}, store=False, user="u1",
    )
    assert response.choices[0].message.content
    assert last_params(fake_engine).logit_bias == ((5, -100.0), (7, 2.5))
    assert response.usage.prompt_tokens_details.cached_tokens == 0


def test_cached_tokens_come_from_the_engine(base_url, fake_engine, monkeypatch):
    monkeypatch.setattr(fake_engine, "num_cached_tokens", 16)
    usage = httpx.post(f"{base_url}/v1/chat/completions", json=CHAT).json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 16}


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(**{**CHAT, "model": "gpt-4o"})
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def test_max_tokens_0_with_echo_scores_the_prompt(base_url, tiny_tokenizer):
    ids = tiny_tokenizer.encode("The capital of France is", add_special_tokens=False)
    body = {"model": "fake-model", "prompt": [ids], "max_tokens": 0, "echo": True, "logprobs": 1}
    choice = httpx.post(f"{base_url}/v1/completions", json=body).json()
    usage, choice = choice["usage"], choice["choices"][0]
    assert choice["text"] == tiny_tokenizer.decode(ids) and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(ids) and choice["logprobs"]["token_logprobs"][0] is None
    assert usage["completion_tokens"] == 0 and usage["total_tokens"] == len(ids)
    chunks = []
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert "".join(c["choices"][0]["text"] for c in chunks) == tiny_tokenizer.decode(ids)
