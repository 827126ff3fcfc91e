"""Structured outputs and tool calls with the real SmolLM2-135M-Instruct weights behind a real `hexgen
serve`, driven by the official openai client: fifty varied JSON Schemas always give content that
validates (unconstrained, the model fails most of them: the rate is printed), JSON mode parses, choice
and regex hold, named and required tool calls always carry valid arguments and stream the same calls;
logit_bias, cached_tokens and scoring with max_tokens 0 on the real engine."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import yaml

from hexcore.executor.ports import free_port
from tests.server.structured_cases import first_json_value, schema_cases
from tests.server.test_e2e import API_KEY, ServerProcess

pytestmark = pytest.mark.slow  # starts a server with the real weights

CONCURRENCY = 16
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}
FLIGHTS = {"name": "find_flights", "description": "Find flights between two airports on a date",
           "parameters": {"type": "object", "properties": {
               "origin": {"type": "string", "pattern": "^[A-Z]{3}$"}, "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
               "date": {"type": "string", "pattern": "^2026-[01][0-9]-[0-3][0-9]$"},
               "passengers": {"type": "integer", "minimum": 1, "maximum": 9}},
               "required": ["origin", "destination", "date", "passengers"], "additionalProperties": False}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": FLIGHTS}]
TOOL_PROMPTS = ["What's the weather in Paris?", "Is it raining in Tokyo right now?", "Book me a flight from Boston to Denver",
                "I need two seats from LHR to JFK on May 3rd", "How warm is it in Cairo, in fahrenheit?",
                "Find flights to Rome from Madrid for my family of four", "Weather for Lima please",
                "Any flights SFO to SEA next Friday?"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2") / "deploy.yaml"
    path.write_text(yaml.safe_dump({"model": "default", "replicas": [{"stages": [{"devices": ["cpu"], "layers": 30}]}],
                                    "engine": {"num_kv_blocks": 512, "enable_prefix_caching": True}}))
    process = ServerProcess(path, free_port())
    try:
        process.wait_healthy(300)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def chat(client, model, prompt, **kwargs):
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kwargs)


def is_valid(value, schema) -> bool:
    try:
        jsonschema.validate(value, schema)
        return True
    except jsonschema.ValidationError:
        return False


def test_fifty_json_schemas_always_validate(client, model):
    cases = schema_cases()

    def constrained(case):
        schema, prompt = case
        response = chat(client, model, prompt, max_tokens=300, response_format={
            "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
        return response.choices[0]

    def free(case):
        return chat(client, model, case[1], max_tokens=300).choices[0].message.content

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        choices = list(pool.map(constrained, cases))
        free_texts = list(pool.map(free, cases))
    for (schema, _), choice in zip(cases, choices):
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
    num_free_valid = sum(is_valid(first_json_value(text), schema) for (schema, _), text in zip(cases, free_texts))
    print(f"\nSmolLM2, 50 JSON Schemas: constrained 50/50 valid; unconstrained {num_free_valid}/50 valid "
          f"(the first JSON object of the reply, same prompt, greedy)")
    assert num_free_valid < 25  # the model alone fails most of them: the grammar does the work


def test_json_mode_output_parses(client, model):
    prompts = ["Give me a JSON object describing a cat.", "List three fruits as JSON.", "What is 2 + 2? Answer in JSON.",
               "Describe the weather in JSON", "Hello!"]
    for prompt in prompts:
        choice = chat(client, model, prompt, max_tokens=200, response_format={"type": "json_object"}).choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # cut by max_tokens: still a prefix of a JSON object
            assert choice.message.content.startswith("{")


def test_choice_and_regex_with_sampling_and_n(client, model):
    choices = chat(client, model, "Is the sky blue?", max_tokens=10, n=4, seed=1, temperature=1.0,
                   extra_body={"guided_choice": ["yes", "no", "it depends"]}).choices
    assert {c.message.content for c in choices} <= {"yes", "no", "it depends"}
    text = chat(client, model, "When was Python released? Give a date.", max_tokens=20,
                extra_body={"structured_outputs": {"regex": r"[12][0-9]{3}-[01][0-9]-[0-3][0-9]"}}).choices[0].message.content
    assert len(text) == 10 and text[4] == "-" and text[7] == "-"
    again = chat(client, model, "Is the sky blue?", max_tokens=10, n=4, seed=1, temperature=1.0,
                 extra_body={"guided_choice": ["yes", "no", "it depends"]}).choices
    assert [c.message.content for c in again] == [c.message.content for c in choices]


def test_named_and_required_tool_calls_always_have_valid_arguments(client, model):
    schemas = {f["name"]: f["parameters"] for f in (WEATHER, FLIGHTS)}

    def call(args):
        prompt, tool_choice = args
        # with parallel calls allowed, a 135M model may append calls until max_tokens: one is asked for
        return chat(client, model, prompt, tools=TOOLS, tool_choice=tool_choice, max_tokens=150,
                    parallel_tool_calls=False).choices[0]

    jobs = [(p, "required") for p in TOOL_PROMPTS]  # one call each (parallel_tool_calls false below)
    jobs += [(p, {"type": "function", "function": {"name": name}}) for p in TOOL_PROMPTS for name in schemas]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(call, jobs))
    for (prompt, tool_choice), choice in zip(jobs, results):
        calls = choice.message.tool_calls
        assert calls and choice.message.content is None, (prompt, choice)
        for tool_call in calls:
            jsonschema.validate(json.loads(tool_call.function.arguments), schemas[tool_call.function.name])
        assert len(calls) == 1
        if isinstance(tool_choice, dict):
            assert [c.function.name for c in calls] == [tool_choice["function"]["name"]]
            assert choice.finish_reason == "stop"
        else:
            assert choice.finish_reason == "tool_calls"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "find_flights"}}])
def test_streamed_tool_call_deltas_reassemble_to_the_non_streamed_calls(client, model, tool_choice):
    kwargs = dict(model=model, messages=[{"role": "user", "content": TOOL_PROMPTS[3]}], temperature=0, max_tokens=150,
                  tools=TOOLS, tool_choice=tool_choice)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            assert not choice.delta.content
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": "", "ids": []})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
                entry["ids"] += [delta.id] if delta.id else []
            finish = choice.finish_reason or finish
    assert [{"name": c["name"], "arguments": c["arguments"]} for _, c in sorted(calls.items())] == \
        [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls]
    assert all(len(c["ids"]) == 1 and c["ids"][0].startswith("call_") for c in calls.values())
    assert finish == whole.finish_reason


def test_logit_bias_cached_tokens_and_scoring_on_the_real_engine(client, model, server):
    prompt = "Write one sentence about the sea. " * 20
    first = chat(client, model, prompt, max_tokens=4)
    again = chat(client, model, prompt, max_tokens=4)
    assert first.usage.prompt_tokens_details.cached_tokens == 0 or first.usage.prompt_tokens_details.cached_tokens < \
        again.usage.prompt_tokens_details.cached_tokens
    assert again.usage.prompt_tokens_details.cached_tokens >= 16 * ((again.usage.prompt_tokens - 1) // 16) - 16
    token = client.completions.create(model=model, prompt="The capital of France is", max_tokens=1, temperature=0,
                                      logprobs=1).choices[0].logprobs.tokens[0]
    tokenize = httpx.post(f"{server.url}/tokenize", json={"prompt": token, "add_special_tokens": False},
                          headers={"Authorization": f"Bearer {API_KEY}"}).json()
    [token_id] = tokenize["tokens"]
    banned = client.completions.create(model=model, prompt="The capital of France is", max_tokens=1, temperature=0,
                                       logit_bias={str(token_id): -100}, logprobs=1).choices[0].logprobs.tokens[0]
    assert banned != token
    scored = client.completions.create(model=model, prompt="The capital of France is Paris", max_tokens=0, echo=True,
                                       logprobs=1)
    assert scored.choices[0].text == "The capital of France is Paris" and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[0] is None and len(scored.choices[0].logprobs.tokens) == \
        scored.usage.prompt_tokens
