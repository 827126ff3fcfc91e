"""Tool calling without a model: the parsers of the Hermes/Qwen and Llama 3 JSON formats, the grammars
of required and named calls, tools in the prompt, and (over the fake engine replying a scripted text)
message.tool_calls and streamed delta.tool_calls that reassemble to the same calls."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server.tools import HERMES, LLAMA3_JSON, ParsedCall, parse_tool_calls, required_calls_schema
from tests.server.conftest import serve_in_thread
from tests.server.fake_engine import FakeEngine

NAMES = {"get_weather", "get_time"}
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Weather in Paris?"}], "temperature": 0,
        "max_tokens": 200}


@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [ParsedCall("get_weather", '{"city": "Paris"}')]),
    ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>', "Let me check.\n",
     [ParsedCall("get_weather", '{"city": "Paris"}'), ParsedCall("get_time", '{"tz": "CET"}')]),
    ('<tool_call>[{"name": "get_time", "arguments": {}}]</tool_call>', None, [ParsedCall("get_time", "{}")]),
    ('<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}', None, [ParsedCall("get_time", '{"tz": "UTC"}')]),
    ('<tool_call>{"name": "launch", "arguments": {}}</tool_call>', "same", []),  # an unknown function
    ('<tool_call>{"name": "get_time", "arguments": {</tool_call>', "same", []),  # broken JSON
    ("It is sunny.", "same", []),
])
def test_hermes_parser(text, content, calls):
    assert parse_tool_calls(text, HERMES, NAMES) == (text if content == "same" else content, calls)


@pytest.mark.parametrize("text, calls", [
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}', [ParsedCall("get_weather", '{"city": "Rome"}')]),
    ('<|python_tag|>{"name": "get_time", "arguments": {"tz": "UTC"}}', [ParsedCall("get_time", '{"tz": "UTC"}')]),
    ('{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}',
     [ParsedCall("get_time", "{}"), ParsedCall("get_weather", '{"city": "Oslo"}')]),
])
def test_llama3_json_parser(text, calls):
    assert parse_tool_calls(text, LLAMA3_JSON, NAMES) == (None, calls)
    assert parse_tool_calls("The answer is 4.", LLAMA3_JSON, NAMES) == ("The answer is 4.", [])


def test_required_schema_accepts_calls_and_refuses_others():
    schema = required_calls_schema([WEATHER, TIME], parallel=True)
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}],
                        schema)
    for bad in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "nope", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "arguments": {}}] * 2, required_calls_schema([TIME], parallel=False))


@pytest.fixture(scope="module")
def fake_engine(tiny_tokenizer):
    return FakeEngine(tokenizer=tiny_tokenizer, max_model_len=4096)  # the tiny tokenizer spends many tokens on tools


@pytest.fixture(scope="module")
def base_url(fake_engine):
    with serve_in_thread(fake_engine) as url:
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")


@pytest.fixture
def scripted(fake_engine):
    def set_script(text):
        fake_engine.script = text
    yield set_script
    fake_engine.script = None


def last_request(fake_engine, tokenizer):
    prompt, params = list(fake_engine.received.values())[-1]
    return tokenizer.decode(prompt), params


def streamed(client, **kwargs):
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or call.id
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content or None, [calls[i] for i in sorted(calls)], finish


def as_dicts(tool_calls):
    return [{"name": c.function.name, "arguments": c.function.arguments} for c in tool_calls or []]


@pytest.mark.parametrize("reply, content", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None),
    ('Checking both.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>', "Checking both.\n"),
    ("It is sunny in Paris, < 30 degrees.", "It is sunny in Paris, < 30 degrees."),
])
def test_auto_tool_calls_parsed_and_streamed_alike(client, fake_engine, tiny_tokenizer, scripted, reply, content):
    scripted(reply)
    response = client.chat.completions.create(**CHAT, tools=TOOLS)
    message, finish = response.choices[0].message, response.choices[0].finish_reason
    _, calls = parse_tool_calls(reply, HERMES, NAMES)
    assert message.content == content and as_dicts(message.tool_calls) == [c.__dict__ for c in calls]
    assert finish == ("tool_calls" if calls else "stop")
    assert all(c.id.startswith("call_") and c.type == "function" for c in message.tool_calls or [])
    # tools went into the system prompt (the tiny template has no tool support)
    prompt, params = last_request(fake_engine, tiny_tokenizer)
    assert "<tools>" in prompt and '"get_weather"' in prompt and params.grammar is None
    s_content, s_calls, s_finish = streamed(client, **CHAT, tools=TOOLS)
    assert (s_content, [{k: c[k] for k in ("name", "arguments")} for c in s_calls], s_finish) == \
        (message.content, as_dicts(message.tool_calls), finish)
    assert all(c["id"].startswith("call_") for c in s_calls)


def test_named_tool_choice_generates_the_arguments_under_their_schema(client, fake_engine, tiny_tokenizer, scripted):
    scripted('{"city": "Paris"}')
    choice = {"type": "function", "function": {"name": "get_weather"}}
    response = client.chat.completions.create(**CHAT, tools=TOOLS, tool_choice=choice)
    _, params = last_request(fake_engine, tiny_tokenizer)
    assert json.loads(params.grammar.source) == WEATHER["parameters"]
    assert as_dicts(response.choices[0].message.tool_calls) == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert response.choices[0].message.content is None and response.choices[0].finish_reason == "stop"
    content, calls, finish = streamed(client, **CHAT, tools=TOOLS, tool_choice=choice)
    assert content is None and finish == "stop"
    assert [{k: c[k] for k in ("name", "arguments")} for c in calls] == as_dicts(response.choices[0].message.tool_calls)


def test_required_tool_choice_generates_a_list_of_calls(client, fake_engine, tiny_tokenizer, scripted):
    scripted('[{"name": "get_time", "arguments": {"tz": "UTC"}}]')
    response = client.chat.completions.create(**CHAT, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    _, params = last_request(fake_engine, tiny_tokenizer)
    assert json.loads(params.grammar.source) == required_calls_schema([WEATHER, TIME], parallel=False)
    assert as_dicts(response.choices[0].message.tool_calls) == [{"name": "get_time", "arguments": '{"tz": "UTC"}'}]
    assert response.choices[0].finish_reason == "tool_calls"
    content, calls, finish = streamed(client, **CHAT, tools=TOOLS, tool_choice="required")
    assert content is None and finish == "tool_calls"
    assert [{k: c[k] for k in ("name", "arguments")} for c in calls] == as_dicts(response.choices[0].message.tool_calls)


def test_tool_choice_none_leaves_tools_out_and_history_is_rendered(client, fake_engine, tiny_tokenizer, scripted):
    scripted("Done.")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]
    response = client.chat.completions.create(**{**CHAT, "messages": messages}, tools=TOOLS, tool_choice="none")
    assert response.choices[0].message.content == "Done." and response.choices[0].message.tool_calls is None
    prompt, _ = last_request(fake_engine, tiny_tokenizer)
    assert "<tools>" not in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n18 C\n</tool_response>" in prompt


def test_a_template_with_tool_support_gets_the_tools(client, fake_engine, tiny_tokenizer, scripted):
    template = tiny_tokenizer.chat_template
    tiny_tokenizer.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments.city }}"
        "{% endfor %}{% endif %}\n{% endfor %}"
    )
    try:
        scripted("ok")
        messages = [*CHAT["messages"], {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]
        client.chat.completions.create(**{**CHAT, "messages": messages}, tools=TOOLS)
        prompt, _ = last_request(fake_engine, tiny_tokenizer)
        assert prompt.startswith("TOOLS:get_weather;get_time;") and "CALL get_weather Oslo" in prompt
    finally:
        tiny_tokenizer.chat_template = template
