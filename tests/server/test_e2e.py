"""The must-show end-to-end tests: a real `hexgen serve` process on a free port, serving a tiny random
Llama over an asymmetric 2-stage deployment ([TP2: 5 layers] -> [TP1: 3 layers]), driven by the
official openai client (sync and async) and by raw httpx streams."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from transformers import AutoTokenizer

from hexcore.executor.ports import free_port
from server.serve_process import ServeProcess
from tests.conftest import deployment

pytestmark = pytest.mark.slow  # starts worker processes

API_KEY = "e2e-key"
STAGES = [(2, 5), (1, 3)]  # (TP degree, layers): asymmetric in both


def ServerProcess(config_path: Path, port: int) -> ServeProcess:
    return ServeProcess(config_path, port, "--api-key", API_KEY, "--log-level", "warning")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("e2e") / "deploy.yaml"
    path.write_text(yaml.safe_dump(deployment(tiny_model_dir, STAGES)))
    process = ServerProcess(path, free_port())
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def chat_prompt_tokens(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_startup_prints_the_deployment_and_url(server):
    text = "".join(server.lines)
    assert re.search(r"TP ?2", text) and re.search(r"TP ?1", text), text
    assert server.url in text


def test_completion_usage_matches_the_tokenizer(client, model, tokenizer):
    prompt = "The capital of France is"
    response = client.completions.create(model=model, prompt=prompt, max_tokens=7, extra_body={"ignore_eos": True})
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert response.usage.completion_tokens == 7 and response.choices[0].finish_reason == "length"
    assert response.usage.total_tokens == response.usage.prompt_tokens + 7


def test_chat_usage_matches_the_tokenizer(client, model, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    response = client.chat.completions.create(model=model, messages=messages, max_tokens=5, extra_body={"ignore_eos": True})
    assert response.usage.prompt_tokens == chat_prompt_tokens(tokenizer, messages)
    assert response.usage.completion_tokens == 5
    assert response.choices[0].message.role == "assistant"


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_greedy_streamed_text_equals_non_streamed(client, model, kind):
    if kind == "completion":
        kwargs = dict(model=model, prompt="Once upon a time", max_tokens=16, temperature=0)
        whole = client.completions.create(**kwargs).choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
    else:
        kwargs = dict(model=model, messages=[{"role": "user", "content": "Tell me about cats"}], max_tokens=16, temperature=0)
        whole = client.chat.completions.create(**kwargs).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True))
    assert streamed == whole and whole


def test_n2_streamed_chat_one_choice_per_chunk(client, model):
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=6, seed=1, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    finishes = {}
    for chunk in chunks[:-1]:
        assert len(chunk.choices) == 1 and chunk.usage is None
        if chunk.choices[0].finish_reason:
            finishes[chunk.choices[0].index] = chunk.choices[0].finish_reason
    assert finishes == {0: "length", 1: "length"}
    first_of_each = {}
    for chunk in chunks[:-1]:
        first_of_each.setdefault(chunk.choices[0].index, chunk.choices[0].delta)
    assert all(delta.role == "assistant" for delta in first_of_each.values())


def test_n2_completion_and_seed_reproducibility(client, model):
    kwargs = dict(model=model, prompt="A quick brown", max_tokens=10, n=2, temperature=1.0, seed=1234)
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    other = client.completions.create(**{**kwargs, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]


def test_stop_string(client, model):
    base = client.completions.create(model=model, prompt="Hello", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop = text[3:6] if len(text.strip()) >= 6 else text[-2:]
    stopped = client.completions.create(model=model, prompt="Hello", max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_include_usage_off_sends_no_usage_chunk(client, model):
    chunks = list(client.completions.create(model=model, prompt="Hi", max_tokens=4, stream=True))
    assert all(chunk.usage is None and len(chunk.choices) == 1 for chunk in chunks)


def test_async_client_chat_and_completion(server, model):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        chat = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        stream = await client.completions.create(model=model, prompt="Hi", max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        await client.close()
        return chat, chunks

    chat, chunks = asyncio.run(main())
    assert chat.choices[0].finish_reason in ("stop", "length") and 1 <= chat.usage.completion_tokens <= 4
    assert chunks[-1].choices == [] and 1 <= chunks[-1].usage.completion_tokens <= 4
    assert all(len(chunk.choices) == 1 for chunk in chunks[:-1])


def test_raw_sse_framing(server, model):
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events)  # no comments, no event: lines
    chunks = [json.loads(event[6:]) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and set(chunks[-1]["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens",
                                                                        "prompt_tokens_details"}  # cached_tokens
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_echo_logprobs_prompt_scoring(client, model, tokenizer):
    prompt = tokenizer.encode("The capital of Italy is Rome")
    response = client.completions.create(model=model, prompt=[prompt], echo=True, logprobs=1, max_tokens=1, temperature=0)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(prompt) + 1
    assert logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert len(logprobs.text_offset) == len(prompt) + 1


# ---- errors: each raises the matching openai exception, and the next normal request succeeds ----

ERROR_CASES = [
    ("negative max_tokens", dict(max_tokens=-1), openai.BadRequestError),
    ("temperature above 2", dict(temperature=2.5), openai.BadRequestError),
    ("top_p of 0", dict(top_p=0.0), openai.BadRequestError),
    ("top_p above 1", dict(top_p=1.5), openai.BadRequestError),
    ("n below 1", dict(n=0), openai.BadRequestError),
    ("unknown model", dict(model="no-such-model"), openai.NotFoundError),  # 404 model_not_found, as OpenAI
    ("prompt over max_model_len", dict(prompt="cat " * 600), openai.BadRequestError),
    ("wrong type", dict(extra_body={"max_tokens": "ten"}), openai.BadRequestError),
    ("unsupported parameter", dict(suffix="!"), openai.BadRequestError),
]


@pytest.mark.parametrize("case, overrides, exception", ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_error_raises_then_server_recovers(client, model, case, overrides, exception):
    kwargs = {"model": model, "prompt": "Hello", "max_tokens": 3, **overrides}
    with pytest.raises(exception) as info:
        client.completions.create(**kwargs)
    assert info.value.body["message"] if isinstance(info.value.body, dict) else info.value.body
    assert client.completions.create(model=model, prompt="Hello", max_tokens=3).choices[0].text is not None


def test_chat_unsupported_tool_type_is_400(client, model):
    with pytest.raises(openai.BadRequestError, match="tools"):  # function tools are served; other kinds are not
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}],
            tools=[{"type": "web_search_preview"}],
        )
    assert client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices


def test_wrong_api_key_is_401(server, model, client):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=model, prompt="Hi", max_tokens=2)
    assert client.completions.create(model=model, prompt="Hi", max_tokens=2).choices


def test_unknown_route_and_model_are_404(server, client, model):
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    response = httpx.get(f"{server.url}/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    assert client.completions.create(model=model, prompt="Hi", max_tokens=2).choices


def test_malformed_json_is_400(server, client, model):
    response = httpx.post(f"{server.url}/v1/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model=model, prompt="Hi", max_tokens=2).choices


def test_oversized_body_is_413(client, model):
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=model, prompt="x" * (33 * 1024 * 1024), max_tokens=2)
    assert info.value.status_code == 413
    assert client.completions.create(model=model, prompt="Hi", max_tokens=2).choices


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_sixteen_streams_complete_while_a_seventeenth_disconnects(server, model, client):
    expected = client.completions.create(model=model, prompt="Once upon a time", max_tokens=24, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
    num_aborted = metric(server, 'hexgen_request_success_total{finish_reason="abort"')

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

        async def full() -> str:
            stream = await aclient.completions.create(model=model, prompt="Once upon a time", max_tokens=24,
                                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
            return "".join([chunk.choices[0].text async for chunk in stream])

        async def leaver() -> int:
            stream = await aclient.completions.create(model=model, prompt="Once upon a time", max_tokens=400,
                                                      stream=True, extra_body={"ignore_eos": True})
            num_chunks = 0
            async for _ in stream:
                num_chunks += 1
                if num_chunks == 12:
                    break
            await stream.close()
            return num_chunks

        results = await asyncio.gather(*(full() for _ in range(16)), leaver())
        await aclient.close()
        return results

    *texts, _ = asyncio.run(main())
    assert texts == [expected] * 16
    deadline = time.monotonic() + 5
    while metric(server, "hexgen_num_requests_running") + metric(server, "hexgen_num_requests_waiting") > 0:
        assert time.monotonic() < deadline, "the abandoned request is still running"
        time.sleep(0.05)
    assert metric(server, 'hexgen_request_success_total{finish_reason="abort"') == num_aborted + 1


def test_metrics_are_labelled_by_replica(server):
    text = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'hexgen_time_to_first_token_seconds_count\{replica="[^"]+"\} [1-9]', text)
    assert re.search(r'hexgen_stage_busy_ratio\{replica="[^"]+",stage="1"\}', text)


def test_two_replicas_behind_one_endpoint_and_full_queue_is_503(tiny_model_dir, tmp_path):
    """Its own server: two one-stage replicas of one sequence each, and room for one waiting request."""
    raw = {**deployment(tiny_model_dir, [(1, 8)], [(1, 8)], max_num_seqs=1), "server": {"max_waiting_requests": 1}}
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(raw))
    busy = ServerProcess(path, free_port())
    model = tiny_model_dir.name

    def running_by_replica() -> dict[str, float]:
        text = httpx.get(f"{busy.url}/metrics").text
        return {m[1]: float(m[2]) for m in re.finditer(r'hexgen_num_requests_running\{replica="([^"]+)"\} (\S+)', text)}

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{busy.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        long = dict(model=model, prompt="Hi", max_tokens=400, stream=True, extra_body={"ignore_eos": True})
        running = [await client.completions.create(**long) for _ in range(2)]
        deadline = time.monotonic() + 10  # the metrics read a snapshot the engine publishes after its next step
        while sum((busy_replicas := running_by_replica()).values()) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        waiting = asyncio.create_task(client.completions.create(model=model, prompt="Hi", max_tokens=2))
        while metric(busy, "hexgen_num_requests_waiting") < 1:
            await asyncio.sleep(0.05)
        with pytest.raises(openai.InternalServerError) as info:
            await client.completions.create(model=model, prompt="Hi", max_tokens=2)
        for stream in running:
            await stream.close()
        recovered = [(await waiting).choices, (await client.completions.create(model=model, prompt="Hi", max_tokens=2)).choices]
        await client.close()
        return busy_replicas, info.value, recovered

    try:
        busy.wait_healthy()
        busy_replicas, error, recovered = asyncio.run(main())
    finally:
        assert busy.stop(signal.SIGINT) == 0  # Ctrl-C: a clean exit too
    assert busy_replicas == {"r0": 1.0, "r1": 1.0}  # the engine's router spread the two long requests
    assert error.status_code == 503 and int(error.response.headers["retry-after"]) >= 1
    assert error.body["code"] == "server_overloaded"
    assert all(recovered)


def test_sigterm_drains_in_flight_requests_and_exits_0(server, model):
    """Last in the module: it stops the shared server."""
    body = {"model": model, "prompt": "Hi", "max_tokens": 60, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        server.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert server.stop() == 0
