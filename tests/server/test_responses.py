"""POST /v1/responses over the fake engine, with the official client: text in and out, instructions and
message input, streamed events whose deltas join to the non-streamed text, text.format as structured
output, and 400s naming what is not supported."""

from __future__ import annotations

import httpx
import openai
import pytest

from hexcore.sampling_params import GrammarSpec


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def test_text_in_text_out(client, fake_engine, tiny_tokenizer):
    response = client.responses.create(model="fake-model", input="Hello", instructions="Be brief.",
                                       max_output_tokens=6, temperature=0)
    assert response.object == "response" and response.id.startswith("resp-") and response.status == "incomplete"
    assert response.output_text and response.output[0].content[0].text == response.output_text
    assert response.usage.output_tokens == 6 and response.incomplete_details.reason == "max_output_tokens"
    prompt, params = list(fake_engine.received.values())[-1]
    assert "Be brief." in tiny_tokenizer.decode(prompt) and params.max_tokens == 6 and params.temperature == 0


def test_message_input_and_streamed_events(client):
    kwargs = dict(model="fake-model", input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                  max_output_tokens=5, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    types = [event.type for event in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_text_format_is_structured_output(client, fake_engine):
    client.responses.create(model="fake-model", input="A cat as JSON", max_output_tokens=4,
                            text={"format": {"type": "json_object"}})
    assert list(fake_engine.received.values())[-1][1].grammar == GrammarSpec("json_object")


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"store": True}, "store"),
    ({"temperature": 3}, "temperature"),
    ({"model": "gpt-4o"}, "model"),
    ({"input": [{"type": "function_call_output", "call_id": "x", "output": "y"}]}, "input"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "strin"}}}},
     "text.format.schema"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_unsupported_features_are_400s_naming_them(base_url, fields, param):
    response = httpx.post(f"{base_url}/v1/responses", json={"model": "fake-model", "input": "Hi", **fields})
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["param"].startswith(param)  # a union's error names its member too
