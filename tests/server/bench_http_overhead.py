"""What the HTTP layer costs per streamed token: server CPU time per SSE chunk, over the fake engine.

    .venv/bin/python -m tests.server.bench_http_overhead [--streams 16] [--tokens 256]

The server (FakeEngine, no token delay) runs in a child process; the clients stream from this one.
The fake engine's own CPU per token is measured apart (its generate loop, no HTTP) and subtracted,
so the figure left is routing, pydantic, JSON, SSE framing and uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import httpx

from hexcore.sampling_params import SamplingParams
from tests.conftest import build_tokenizer
from hexcore.executor.ports import free_port
from tests.server.fake_engine import FakeEngine


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _serve(tokenizer_dir: str, port: int, max_model_len: int) -> None:
    import uvicorn
    from transformers import AutoTokenizer

    from server.app import build_app

    engine = FakeEngine(AutoTokenizer.from_pretrained(tokenizer_dir), max_model_len=max_model_len)
    uvicorn.run(build_app(engine), host="127.0.0.1", port=port, log_level="warning")


async def _stream_all(url: str, num_streams: int, num_tokens: int) -> int:
    body = {"prompt": "Hello", "max_tokens": num_tokens, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=num_streams)) as client:
        async def one() -> int:
            num_chunks = 0
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    num_chunks += line.startswith("data: {")
            return num_chunks

        return sum(await asyncio.gather(*(one() for _ in range(num_streams))))


async def _engine_only_cpu_per_token(engine: FakeEngine, num_tokens: int) -> float:
    await engine.start()
    params = SamplingParams(max_tokens=num_tokens, ignore_eos=True)
    start = time.process_time()
    async for _ in engine.generate("solo", engine.tokenizer.encode("Hello"), params):
        pass
    return (time.process_time() - start) / num_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    max_model_len = args.tokens + 64
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer = build_tokenizer(Path(tokenizer_dir))
        engine_cpu = asyncio.run(_engine_only_cpu_per_token(FakeEngine(tokenizer, max_model_len=max_model_len), args.tokens))
        port = free_port()
        server = multiprocessing.get_context("spawn").Process(target=_serve, args=(tokenizer_dir, port, max_model_len))
        server.start()
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        asyncio.run(_stream_all(url, 2, 8))  # warm-up
        cpu_before, wall_before = _cpu_seconds(server.pid), time.monotonic()
        num_chunks = asyncio.run(_stream_all(url, args.streams, args.tokens))
        server_cpu, wall = _cpu_seconds(server.pid) - cpu_before, time.monotonic() - wall_before
        server.terminate()
        server.join()
    per_chunk = server_cpu / num_chunks
    print(f"{args.streams} concurrent streams x {args.tokens} tokens: {num_chunks} chunks in {wall:.2f} s "
          f"({num_chunks / wall:.0f} chunks/s, clients in the same machine)")
    print(f"server CPU per chunk: {per_chunk * 1e6:.0f} us, of which the fake engine {engine_cpu * 1e6:.0f} us; "
          f"HTTP layer ~{(per_chunk - engine_cpu) * 1e6:.0f} us per streamed token")


if __name__ == "__main__":
    main()
