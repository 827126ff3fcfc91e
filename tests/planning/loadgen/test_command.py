"""`hexgen bench serve` against a tiny in-process fake OpenAI streaming server."""

import asyncio
import json
import math
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from planning.loadgen.datasets import BenchRequest
from planning.loadgen.command import run_load
from server.entrypoint import main

TOKEN_DELAY_S = 0.01


class FakeServer:
    """Streams one word per token with a fixed delay; word-level /tokenize and /detokenize."""

    def __init__(self):
        self.is_rejecting_ignore_eos = False
        self.num_in_flight = self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.vocab: list[str] = []
        self.app = FastAPI()
        self.app.post("/v1/completions")(self.completions)
        self.app.post("/tokenize")(self.tokenize)
        self.app.post("/detokenize")(self.detokenize)
        self.app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def completions(self, request: Request):
        body = await request.json()
        if body.get("ignore_eos") and self.is_rejecting_ignore_eos:
            error = {"message": "unknown parameter ignore_eos", "type": "invalid_request_error", "param": "ignore_eos"}
            return JSONResponse({"error": error}, status_code=400)
        self.bodies.append(body)
        return StreamingResponse(self._events(body), media_type="text/event-stream")

    async def _events(self, body: dict):
        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        num_tokens = body["max_tokens"]
        try:
            for i in range(num_tokens):
                await asyncio.sleep(TOKEN_DELAY_S)
                yield _event({"object": "text_completion", "choices": [{"index": 0, "text": f" w{i}", "finish_reason": None}]})
            yield _event({"object": "text_completion", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
            prompt_tokens = len(body["prompt"].split())
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": num_tokens, "total_tokens": prompt_tokens + num_tokens}
            yield _event({"object": "text_completion", "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            self.num_in_flight -= 1

    async def tokenize(self, request: Request):
        words = (await request.json())["prompt"].split()
        for word in words:
            if word not in self.vocab:
                self.vocab.append(word)
        return {"tokens": [self.vocab.index(w) for w in words], "count": len(words), "max_model_len": 2048}

    async def detokenize(self, request: Request):
        return {"prompt": " ".join(self.vocab[i] for i in (await request.json())["tokens"])}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@pytest.fixture(scope="module")
def fake():
    fake = FakeServer()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    fake.base_url = f"http://127.0.0.1:{port}/v1"
    yield fake
    server.should_exit = True
    thread.join(timeout=5)


def test_load_generator_times_every_request_and_caps_concurrency(fake):
    fake.max_in_flight, fake.is_rejecting_ignore_eos = 0, False
    requests = [BenchRequest(f"p{i} a b", 3, num_output_tokens=5) for i in range(6)]
    records, duration = asyncio.run(
        run_load(fake.base_url, "fake-model", requests, [0.0] * 6, max_concurrency=2, show_progress=False)
    )
    assert all(r.is_success for r in records), [r.error for r in records]
    assert all(r.num_output_tokens == 5 and r.num_prompt_tokens == 3 and len(r.itls) == 4 for r in records)
    assert all(r.ttft >= TOKEN_DELAY_S * 0.9 and r.e2e >= 5 * TOKEN_DELAY_S * 0.9 for r in records)
    assert fake.max_in_flight == 2
    assert duration >= 3 * 5 * TOKEN_DELAY_S * 0.9  # 6 requests, 2 at a time, 5 tokens each
    assert fake.bodies[-1]["stream"] and fake.bodies[-1]["stream_options"] == {"include_usage": True}
    assert fake.bodies[-1]["ignore_eos"] is True


def test_load_generator_drops_ignore_eos_when_the_server_rejects_it(fake):
    fake.is_rejecting_ignore_eos = True
    requests = [BenchRequest("x y", None, num_output_tokens=2)] * 2
    records, _ = asyncio.run(run_load(fake.base_url, "fake-model", requests, [0.0, 0.0], show_progress=False))
    assert all(r.is_success and r.num_prompt_tokens == 2 for r in records)
    assert "ignore_eos" not in fake.bodies[-1]
    fake.is_rejecting_ignore_eos = False


def test_cli_builds_exact_length_prompts_with_the_server_tokenizer_and_saves_json(fake, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "serve", "--base-url", fake.base_url, "--input-len", "7", "--output-len", "3",
            "--num-prompts", "4", "--request-rate", "50", "--slo-ttft", "1000", "--slo-tpot", "1000",
            "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["config"]["model"] == "fake-model"  # taken from /v1/models
    summary = report["summary"]
    assert summary["num_completed"] == 4 and summary["total_input_tokens"] == 4 * 7
    assert summary["total_output_tokens"] == 12 and summary["goodput"] > 0
    assert math.isclose(summary["request_throughput"] * summary["duration_s"], 4)
    assert "Median TTFT (ms)" in capsys.readouterr().out


def test_cli_reports_an_unreachable_server_as_a_clean_error(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--num-prompts", "1"]
    assert main(argv) == 2
    assert "warm-up request" in capsys.readouterr().err
