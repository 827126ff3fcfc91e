"""One streaming OpenAI completions request, timed chunk by chunk (see bench_metrics for the definitions)."""

from __future__ import annotations

import json
import time

import httpx

from planning.loadgen.datasets import BenchRequest
from planning.loadgen.metrics import RequestRecord, record_from_timestamps


def completion_payload(model: str, request: BenchRequest, is_ignore_eos: bool) -> dict:
    """A greedy streaming completion that asks for the usage chunk (to count output tokens)."""
    payload = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.num_output_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if is_ignore_eos:  # a common extension: generate exactly max_tokens
        payload["ignore_eos"] = True
    return payload


async def stream_completion(
    client: httpx.AsyncClient, url: str, model: str, request: BenchRequest, is_ignore_eos: bool
) -> RequestRecord:
    """Send one request and time its stream; failures come back as records, never as exceptions."""
    content_times: list[float] = []
    last_choice_time = 0.0
    usage: dict = {}
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=completion_payload(model, request, is_ignore_eos)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                return RequestRecord(is_success=False, error=f"HTTP {response.status_code}: {body[:300]}")
            async for line in response.aiter_lines():
                now = time.perf_counter() - start
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestRecord(is_success=False, error=f"error in stream: {chunk['error']}")
                if chunk.get("choices"):
                    last_choice_time = now
                    if chunk["choices"][0].get("text"):
                        content_times.append(now)
                usage = chunk.get("usage") or usage
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        return RequestRecord(is_success=False, error=f"{type(err).__name__}: {err}")
    return record_from_timestamps(
        content_times,
        last_choice_time,
        # without a usage chunk, one token per text chunk is the best estimate
        num_output_tokens=usage.get("completion_tokens", len(content_times)),
        num_prompt_tokens=usage.get("prompt_tokens", request.num_prompt_tokens or 0),
    )
