"""The service stays up, end to end through `hexgen serve`: a worker SIGKILLed mid-stream fails its
replica alone while every stream completes; a replica that cannot come back ends the server with a
non-zero status; a burst fills the free running slots before anything counts as waiting; a shutdown
cuts the streams still running at the drain's end with an error event and [DONE], logs no engine
error, and leaves no worker behind. Workers are found by the names they give themselves (hx-REPLICA-RANK)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from hexcore.executor.ports import free_port
from server.serve_process import ServeProcess
from tests.conftest import deployment

pytestmark = pytest.mark.slow  # starts servers and worker processes


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def worker_pids(server: ServeProcess) -> dict[str, int]:
    """The server's worker processes by the names they give themselves (hx-REPLICA-RANK)."""
    pids = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            name, pid = Path(f"/proc/{entry}/comm").read_text().strip(), int(entry)
            if name.startswith("hx-") and server.process.pid in (_parent(pid), _parent(_parent(pid))):
                pids[name] = pid
        except (OSError, ValueError, IndexError):
            continue
    return pids


def is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def serve(tmp_path: Path, raw: dict) -> ServeProcess:
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(raw))
    server = ServeProcess(path, free_port(), "--log-level", "info")
    server.wait_healthy()
    return server


async def stream_tokens(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> int:
    """Output tokens of one streamed completion (it must end normally)."""
    num_tokens = 0
    stream = await client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, stream=True,
                                             temperature=0.0, extra_body={"ignore_eos": True},
                                             stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            num_tokens = chunk.usage.completion_tokens
    return num_tokens


def test_sigkill_mid_stream_fails_one_replica_and_every_stream_completes(tiny_model_dir, tmp_path):
    raw = deployment(tiny_model_dir, [(1, 8)], [(1, 4), (1, 4)], max_num_batched_tokens=32)
    raw["served_model_name"] = "m"
    for name, replica in zip(("a", "b"), raw["replicas"]):
        replica.update(name=name, predicted_throughput_rps=1.0)  # equal weights: streams on both replicas
    server = serve(tmp_path, raw)
    try:
        async def run() -> list[int]:
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
            streams = [asyncio.create_task(stream_tokens(client, f"prompt number {i}", 120)) for i in range(8)]
            await asyncio.sleep(1.0)  # every stream is under way
            os.kill(worker_pids(server)["hx-b-1"], signal.SIGKILL)
            return list(await asyncio.gather(*streams))

        assert asyncio.run(run()) == [120] * 8
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/health").json()["replicas"]["b"]["is_up"] is not True:
            assert time.monotonic() < deadline, "replica b not back within 30 s"
            time.sleep(0.25)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'hexgen_replica_restarts_total{replica="b"} 1.0' in metrics
        assert 'hexgen_replica_up{replica="a"} 1.0' in metrics and 'hexgen_replica_up{replica="b"} 1.0' in metrics
        assert "replica b failed: replica 'b' stage 1 rank 1 (device cpu): killed by SIGKILL" in server.output
    finally:
        assert server.stop() == 0


def test_a_replica_that_cannot_restart_ends_the_server_non_zero(tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    raw = deployment(model_dir, [(1, 8)], max_restart_attempts=2)
    server = serve(tmp_path, raw)
    shutil.rmtree(model_dir)
    os.kill(worker_pids(server)["hx-r0-0"], signal.SIGKILL)
    assert server.process.wait(timeout=60) == 1
    assert "did not come back after 2 restarts" in server.output


def test_a_burst_fills_the_free_running_slots_before_anything_waits(tiny_model_dir, tmp_path):
    raw = deployment(tiny_model_dir, [(1, 8)], max_num_seqs=16)
    raw["server"] = {"max_waiting_requests": 4}
    server = serve(tmp_path, raw)
    try:
        async def burst(num_requests: int) -> list[int]:
            async with httpx.AsyncClient(timeout=120) as client:
                body = {"prompt": "Hello", "max_tokens": 8, "ignore_eos": True}
                responses = await asyncio.gather(*(client.post(f"{server.url}/v1/completions", json=body)
                                                   for _ in range(num_requests)))
            return [r.status_code for r in responses]

        assert asyncio.run(burst(20)) == [200] * 20  # 16 running + 4 waiting
        codes = asyncio.run(burst(40))
        assert codes.count(200) >= 20 and set(codes) <= {200, 503}
    finally:
        assert server.stop() == 0


def test_shutdown_cuts_late_streams_cleanly_and_leaves_no_worker(tiny_model_dir, tmp_path):
    raw = deployment(tiny_model_dir, [(1, 4), (1, 4)], num_kv_blocks=512)
    raw["server"] = {"drain_seconds": 2.0}
    server = serve(tmp_path, raw)
    workers = worker_pids(server)
    assert sorted(workers) == ["hx-r0-0", "hx-r0-1"]
    body = {"prompt": "Hi", "max_tokens": 480, "n": 16, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        server.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["error"]["code"] == "server_shutting_down"
    assert server.process.wait(timeout=30) == 0
    deadline = time.monotonic() + 2
    while any(is_running(pid) for pid in workers.values()):
        assert time.monotonic() < deadline, f"workers left 2 s after exit: {workers}"
        time.sleep(0.05)
    assert "EngineDead" not in server.output and "Traceback" not in server.output
