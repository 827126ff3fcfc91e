"""Chaos: a two-replica SmolLM2 deployment served by `hexgen serve` under steady load, first without
failures (the baseline), then with a random worker SIGKILLed every --kill-every seconds.

Requests are streaming greedy completions with `ignore_eos` arriving as a Poisson process; a request
succeeds when its stream ends with [DONE] after exactly --output-len tokens. Reported per phase:
requests sent, completed, failed, p50/p99 end-to-end latency; and for every kill, the worker's
replica and the time until /health shows every replica up again (and the first request completed
after that).

    .venv/bin/python -m benchmarks.bench_chaos [--minutes 10] [--baseline-minutes 3] [--rate 0.5] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

from hexcore.executor.ports import free_port
from server.serve_process import ServeProcess

DEPLOYMENT = {  # the pair: one whole-model replica, one two-stage replica
    "model": "default",
    "replicas": [{"name": "r0", "stages": [{"devices": ["cpu"], "layers": 30}]},
                 {"name": "r1", "stages": [{"devices": ["cpu"], "layers": 15}, {"devices": ["cpu"], "layers": 15}]}],
    "engine": {"max_num_seqs": 32},
}


def worker_pids(server_pid: int) -> list[int]:
    """The server's worker processes: children of its multiprocessing forkserver."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except (OSError, IndexError):
                pass
    forkservers = [pid for pid in children.get(server_pid, [])
                   if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return [pid for fs in forkservers for pid in children.get(fs, [])]


def replicas_up(url: str) -> dict[str, bool]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {line.split('replica="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1]) == 1.0
            for line in text.splitlines() if line.startswith("hexgen_replica_up{")}


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, output_len: int) -> dict:
    payload = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started, tokens, is_done, error = time.monotonic(), 0, False, ""
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=payload) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line.removeprefix("data:").strip()
                    if data == "[DONE]":
                        is_done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = chunk["error"].get("message", "error event")[:200]
                    elif chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        error = f"{type(err).__name__}: {err}"
    ok = is_done and not error and tokens == output_len
    return {"start": started, "end": time.monotonic(), "ok": ok, "error": error or ("" if ok else f"{tokens} tokens")}


async def drive(url: str, rate: float, seconds: float, output_len: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = "the of and to in is that for it as with was on be by at this from".split()
    tasks = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        started = time.monotonic()
        next_at = started
        while next_at - started < seconds:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            prompt = " ".join(rng.choice(words) for _ in range(48))
            tasks.append(asyncio.create_task(one_request(client, url, prompt, output_len)))
            next_at += rng.expovariate(rate)
        return list(await asyncio.gather(*tasks))


async def kill_loop(url: str, server_pid: int, every: float, seconds: float, seed: int) -> list[dict]:
    rng, kills = random.Random(seed + 1), []
    started = time.monotonic()
    while time.monotonic() - started + every < seconds:
        await asyncio.sleep(every)
        pid = rng.choice(worker_pids(server_pid))
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        kill = {"at": killed_at, "pid": pid, "replica": None, "seconds_to_up": None}
        while time.monotonic() - killed_at < every - 1:
            await asyncio.sleep(0.25)
            up = await asyncio.to_thread(replicas_up, url)
            down = [name for name, is_up in up.items() if not is_up]
            if down and kill["replica"] is None:
                kill["replica"] = down[0]
            if kill["replica"] is not None and all(up.values()):
                kill["seconds_to_up"] = round(time.monotonic() - killed_at, 2)
                break
        kill["replica"] = kill["replica"] or "?"
        kills.append(kill)
        print(f"  kill pid {pid} ({kill['replica']}): all replicas up again after {kill['seconds_to_up']} s", flush=True)
    return kills


def summary(name: str, records: list[dict]) -> dict:
    ok = [r for r in records if r["ok"]]
    latencies = np.array([r["end"] - r["start"] for r in ok]) if ok else np.array([float("nan")])
    row = {"phase": name, "sent": len(records), "completed": len(ok), "failed": len(records) - len(ok),
           "p50_s": round(float(np.percentile(latencies, 50)), 2), "p99_s": round(float(np.percentile(latencies, 99)), 2)}
    errors = sorted({r["error"] for r in records if not r["ok"]})
    if errors:
        row["errors"] = errors[:5]
    return row


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "deploy.yaml"
        config_path.write_text(yaml.safe_dump(DEPLOYMENT))
        server = ServeProcess(config_path, free_port(), "--log-level", "info")
        url, process = server.url, server.process
        try:
            server.wait_healthy(300)
            print(f"baseline: {args.baseline_minutes} min at {args.rate} req/s", flush=True)
            baseline = await drive(url, args.rate, args.baseline_minutes * 60, args.output_len, args.seed)
            print(f"chaos: {args.minutes} min at {args.rate} req/s, a worker SIGKILLed every {args.kill_every} s", flush=True)
            seconds = args.minutes * 60
            chaos, kills = await asyncio.gather(drive(url, args.rate, seconds, args.output_len, args.seed + 7),
                                                kill_loop(url, process.pid, args.kill_every, seconds, args.seed))
            is_alive = process.poll() is None
        finally:
            server.stop()
            Path(args.log).write_text(server.output)
    return {"rate_rps": args.rate, "output_len": args.output_len, "server_alive_at_end": is_alive,
            "phases": [summary("no kills", baseline), summary("kills", chaos)], "kills": kills}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the phase with kills")
    parser.add_argument("--baseline-minutes", type=float, default=3.0, help="length of the phase without kills")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills")
    parser.add_argument("--rate", type=float, default=0.5, help="requests per second (Poisson)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", default="/tmp/hexgen-chaos-server.log", help="the server's log")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(f"\n{'phase':<10} {'sent':>5} {'completed':>9} {'failed':>6} {'p50 s':>6} {'p99 s':>6}")
    for row in result["phases"]:
        print(f"{row['phase']:<10} {row['sent']:>5} {row['completed']:>9} {row['failed']:>6} {row['p50_s']:>6} "
              f"{row['p99_s']:>6}  {'; '.join(row.get('errors', []))}")
    times = [k["seconds_to_up"] for k in result["kills"] if k["seconds_to_up"] is not None]
    print(f"kills: {len(result['kills'])}; seconds from kill to every replica up: {times}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
