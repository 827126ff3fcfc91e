"""hexgen against vLLM (CPU) and llama.cpp's server on this machine, same weights, same client, same workload.

Each server runs alone (started, measured, stopped in turn, back to back), in the same dtype, on
SmolLM2-135M-Instruct: hexgen's HF directory (`model: default`) is what vLLM loads, and what
llama.cpp's converter turns into a GGUF of that dtype. The client is this script: random prompts of
exactly `--prompt-len` token ids, `--output-len` output tokens (ignore_eos, greedy), prefix caching
off everywhere. Per server and dtype it prints:

  tok/s @ C      output tokens / wall time of C concurrent non-streaming completions (C in --concurrency)
  TTFT, TPOT     p50 / p99 over --ttft-concurrency concurrent streaming completions
  batch-1        ms per output token of one streaming request alone (decode: first token excluded)
  peak RSS       the server's process tree (HTTP, engine and worker processes), sampled every 0.2 s

The peers live outside the project's venv, set up once by benchmarks/peers/setup.sh under
$HEXGEN_PEERS (default /root/.cache/hexgen-peers); a peer that is not set up is skipped with a note.
Never part of CI or `make test`. Run from the repository root:

    .venv/bin/python -m benchmarks.bench_peers [--servers hexgen vllm llama] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml

from hexcore.model.files import resolve_model_dir

REPO = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("HEXGEN_PEERS", "/root/.cache/hexgen-peers"))
NUM_THREADS = 2  # the machine's cores: every server gets both
FIRST_ORDINARY_TOKEN = 100  # SmolLM2's special tokens sit below this id
SERVERS = ("hexgen-before", "hexgen", "vllm", "llama")


@dataclass
class Result:
    server: str
    dtype: str
    tokens_per_second: dict[int, float] = field(default_factory=dict)  # concurrency -> output tok/s
    ttft_ms: tuple[float, float] = (0.0, 0.0)  # p50, p99
    tpot_ms: tuple[float, float] = (0.0, 0.0)
    batch1_ms_per_token: float = 0.0
    peak_rss_mb: float = 0.0
    load_average: float = 0.0  # 1-minute, when the server's measurements ended
    # the tok/s run at --ttft-concurrency: its wall time and each process's CPU time (summed by name)
    wall_seconds: float = 0.0
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    note: str = ""


# ---------------------------------------------------------------------------------------------------
# the servers


class Server:
    """One server process group; `stop()` ends the whole group."""

    name = ""

    def __init__(self, command: list[str], env: dict, port: int, log: Path, cwd: Path = REPO):
        self.port, self.log = port, log
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                        cwd=cwd, start_new_session=True)

    def wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready within {seconds} s: see {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:  # children that outlived the leader
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def payload_extras(self) -> dict:
        return {}


class HexgenServer(Server):
    name = "hexgen"

    def __init__(self, dtype: str, port: int, workdir: Path, max_concurrency: int, extra_engine: dict,
                 checkout: Path = REPO):
        """`checkout`: the repository to run hexgen from (another one: a `git worktree` of an earlier commit)."""
        config = {"model": "default", "dtype": dtype, "max_model_len": 2048,
                  "replicas": [{"name": "r0", "stages": [{"devices": ["cpu"], "layers": 30}]}],
                  "engine": {"max_num_seqs": max(64, max_concurrency), "enable_prefix_caching": False,
                             **extra_engine}}
        if checkout != REPO:
            self.name = "hexgen-before"
        path = workdir / f"{self.name}-{dtype}.yaml"
        path.write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "server.entrypoint", "serve", "--config", str(path),
                   "--port", str(port), "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        super().__init__(command, env, port, workdir / f"{self.name}-{dtype}.log", cwd=checkout)


class VllmServer(Server):
    name = "vllm"
    python = PEERS / "vllm-venv" / "bin" / "python"

    def __init__(self, dtype: str, port: int, workdir: Path, max_concurrency: int, model_dir: Path):
        command = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                   "--served-model-name", "model", "--dtype", dtype, "--port", str(port),
                   "--max-model-len", "2048", "--max-num-seqs", str(max(64, max_concurrency)),
                   "--no-enable-prefix-caching", "--disable-log-stats", "--disable-uvicorn-access-log"]
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{NUM_THREADS - 1}",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "4"}
        env.pop("PYTHONPATH", None)
        super().__init__(command, env, port, workdir / f"vllm-{dtype}.log")


class LlamaServer(Server):
    name = "llama"
    binary = PEERS / "llama-build" / "bin" / "llama-server"

    def __init__(self, dtype: str, port: int, workdir: Path, max_concurrency: int, gguf: Path):
        slots = max(64, max_concurrency)
        command = [str(self.binary), "-m", str(gguf), "--port", str(port), "-t", str(NUM_THREADS),
                   "-tb", str(NUM_THREADS), "--parallel", str(slots), "-c", str(slots * 256),
                   "--cont-batching", "--no-warmup"]
        super().__init__(command, dict(os.environ), port, workdir / f"llama-{dtype}.log")

    def payload_extras(self) -> dict:
        return {"cache_prompt": False}


def peer_model_dir() -> Path:
    """hexgen's HF directory as the peers want it: `architectures` set in config.json, rope_theta at top
    level too (the weights and tokenizer are links to hexgen's files)."""
    source = resolve_model_dir("default")
    target = PEERS / "model-hf"
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name != "config.json" and not (target / path.name).exists():
            (target / path.name).symlink_to(path)
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    config["torch_dtype"] = "float32"
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def peer_gguf(dtype: str) -> Path:
    """The HF directory converted by llama.cpp's own converter, once per dtype (f32 / bf16)."""
    outtype = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    gguf = PEERS / f"SmolLM2-135M-Instruct-{outtype}.gguf"
    if not gguf.is_file():
        converter = PEERS / "llama.cpp" / "convert_hf_to_gguf.py"  # with its own gguf-py, in the vLLM venv
        env = {**os.environ, "PYTHONPATH": str(PEERS / "llama.cpp" / "gguf-py")}
        subprocess.run([str(VllmServer.python), str(converter), str(peer_model_dir()), "--outtype", outtype,
                        "--outfile", str(gguf)], check=True, env=env)
    return gguf


def is_set_up(name: str) -> bool:
    return name.startswith("hexgen") or (PEERS / f"{name}.done").is_file()


def start(name: str, dtype: str, port: int, workdir: Path, args: argparse.Namespace) -> Server:
    max_concurrency, extra_engine = max(args.concurrency), json.loads(args.hexgen_engine)
    if name == "hexgen":
        return HexgenServer(dtype, port, workdir, max_concurrency, extra_engine)
    if name == "hexgen-before":
        return HexgenServer(dtype, port, workdir, max_concurrency, extra_engine, Path(args.before).resolve())
    if name == "vllm":
        return VllmServer(dtype, port, workdir, max_concurrency, peer_model_dir())
    return LlamaServer(dtype, port, workdir, max_concurrency, peer_gguf(dtype))


# ---------------------------------------------------------------------------------------------------
# the client


def process_tree(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds_by_name(root_pid: int) -> dict[str, float]:
    """CPU time (user + system, all threads) so far of each process of a tree, summed per process name
    (where a server's time goes: its HTTP / scheduling process against the processes running the model)."""
    tick, seconds = os.sysconf("SC_CLK_TCK"), {}
    for pid in process_tree(root_pid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1: stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return seconds


class RssSampler:
    """Peak resident memory of a process tree, summed over its processes, sampled every 0.2 s."""

    def __init__(self, root_pid: int):
        self.root_pid, self.peak_bytes = root_pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.2):
            total = 0
            for pid in process_tree(self.root_pid):
                try:
                    total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
                except (OSError, IndexError):
                    pass
            self.peak_bytes = max(self.peak_bytes, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_bytes / 2**20


def make_prompts(num_prompts: int, prompt_len: int, vocab_size: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(FIRST_ORDINARY_TOKEN, vocab_size) for _ in range(prompt_len)] for _ in range(num_prompts)]


def payload(model: str, prompt: list[int], output_len: int, is_stream: bool, extras: dict) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": is_stream, **extras}


async def complete(client: httpx.AsyncClient, server: Server, model: str, prompt: list[int],
                   output_len: int) -> int:
    """One non-streaming completion: its number of output tokens."""
    response = await client.post(f"{server.url}/v1/completions",
                                 json=payload(model, prompt, output_len, False, server.payload_extras()))
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"]


async def stream(client: httpx.AsyncClient, server: Server, model: str, prompt: list[int],
                 output_len: int) -> tuple[float, float]:
    """One streaming completion: (seconds to the first text chunk, seconds per later output token)."""
    started = time.perf_counter()
    first = last = None
    body = payload(model, prompt, output_len, True, server.payload_extras())
    async with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            data = line.removeprefix("data:").strip()
            if not line.startswith("data:") or data == "[DONE]":
                continue
            choices = json.loads(data).get("choices") or []
            if choices and choices[0].get("text"):
                last = time.perf_counter() - started
                first = last if first is None else first
    assert first is not None, f"{server.name}: no text streamed"
    return first, (last - first) / (output_len - 1)


async def throughput(server: Server, model: str, prompts: list[list[int]], output_len: int,
                     concurrency: int) -> float:
    """Output tok/s of every prompt, `concurrency` requests in flight at a time."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(prompt):
            async with gate:
                return await complete(client, server, model, prompt, output_len)
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        seconds = time.perf_counter() - started
    assert all(c == output_len for c in counts), f"{server.name}: ignore_eos not honoured: {set(counts)}"
    return sum(counts) / seconds


async def latencies(server: Server, model: str, prompts: list[list[int]], output_len: int) -> list[tuple[float, float]]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(prompts) + 4)) as client:
        return await asyncio.gather(*(stream(client, server, model, p, output_len) for p in prompts))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(server: Server, dtype: str, args: argparse.Namespace, rng: random.Random, vocab_size: int) -> Result:
    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    new = lambda n: make_prompts(n, args.prompt_len, vocab_size, rng)  # noqa: E731 (fresh prompts: no cache hits)
    result = Result(server.name, dtype)
    rss = RssSampler(server.process.pid)
    asyncio.run(throughput(server, model, new(8), args.output_len, 8))  # warm-up (compiles, first-use builds)
    for concurrency in args.concurrency:
        num_prompts = concurrency if concurrency > 1 else args.batch1_requests
        cpu_before, started = cpu_seconds_by_name(server.process.pid), time.perf_counter()
        result.tokens_per_second[concurrency] = asyncio.run(
            throughput(server, model, new(num_prompts), args.output_len, concurrency))
        if concurrency == args.ttft_concurrency:
            result.wall_seconds = time.perf_counter() - started
            result.cpu_seconds = {name: seconds - cpu_before.get(name, 0.0)
                                  for name, seconds in cpu_seconds_by_name(server.process.pid).items()}
        print(f"  {server.name} {dtype} @{concurrency}: {result.tokens_per_second[concurrency]:.1f} tok/s "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
    timed = asyncio.run(latencies(server, model, new(args.ttft_concurrency), args.output_len))
    result.ttft_ms = tuple(1e3 * percentile([t for t, _ in timed], q) for q in (50, 99))
    result.tpot_ms = tuple(1e3 * percentile([p for _, p in timed], q) for q in (50, 99))
    alone = [asyncio.run(latencies(server, model, new(1), args.output_len))[0][1] for _ in range(args.batch1_requests)]
    result.batch1_ms_per_token = 1e3 * statistics.median(alone)
    result.peak_rss_mb = rss.stop()
    result.load_average = os.getloadavg()[0]
    return result


# ---------------------------------------------------------------------------------------------------


def format_table(results: list[Result], concurrency: list[int], ttft_concurrency: int) -> str:
    head = (["server", "dtype"] + [f"tok/s @{c}" for c in concurrency]
            + [f"TTFT p50/p99 ms @{ttft_concurrency}", f"TPOT p50/p99 ms @{ttft_concurrency}",
               "batch-1 ms/tok", "peak RSS MB", "load"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.note:
            lines.append(f"| {r.server} | {r.dtype} | " + r.note + " |")
            continue
        cells = ([r.server, r.dtype] + [f"{r.tokens_per_second.get(c, 0):.1f}" for c in concurrency]
                 + [f"{r.ttft_ms[0]:.0f} / {r.ttft_ms[1]:.0f}", f"{r.tpot_ms[0]:.1f} / {r.tpot_ms[1]:.1f}",
                    f"{r.batch1_ms_per_token:.1f}", f"{r.peak_rss_mb:.0f}", f"{r.load_average:.2f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_cpu_split(results: list[Result], concurrency: int) -> str:
    """Where each server's CPU went during its @concurrency run: per process name, as CPU seconds and as
    a share of the 2 cores over the run's wall time."""
    lines = [f"CPU time by process over the tok/s @{concurrency} run (seconds; share of {NUM_THREADS} cores x wall):"]
    for r in results:
        if r.note or not r.wall_seconds:
            continue
        top = sorted(r.cpu_seconds.items(), key=lambda item: -item[1])
        parts = [f"{name} {seconds:.1f}" for name, seconds in top if seconds >= 0.05]
        busy = sum(r.cpu_seconds.values()) / (NUM_THREADS * r.wall_seconds)
        lines.append(f"  {r.server} {r.dtype}: wall {r.wall_seconds:.1f}; " + ", ".join(parts) + f"; cores busy {busy:.0%}")
    return "\n".join(lines)


def spread(values: list[float]) -> str:
    """Ratios, one per hexgen run: "1.05 / 1.12x"."""
    return " / ".join(f"{v:.2f}" for v in values) + "x"


def ratios(results: list[Result], concurrency: list[int]) -> str:
    """hexgen against each peer in the same dtype, at every concurrency and batch 1: one ratio per
    hexgen run (a list of servers may run hexgen before and after its peers, to bracket the drift)."""
    lines = []
    measured = [r for r in results if not r.note]
    for r in measured:
        ours = [o for o in measured if o.server == "hexgen" and o.dtype == r.dtype]
        if r.server == "hexgen" or not ours:
            continue
        parts = [f"tok/s @{c} " + spread([o.tokens_per_second[c] / r.tokens_per_second[c] for o in ours])
                 for c in concurrency]
        parts.append("batch-1 ms/tok " + spread([o.batch1_ms_per_token / r.batch1_ms_per_token for o in ours])
                     + " (lower is better)")
        lines.append(f"hexgen / {r.server} ({r.dtype}): " + ", ".join(parts))
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=["hexgen", "vllm", "llama"],
                        help="hexgen-before: hexgen run from --before, a checkout of an earlier commit")
    parser.add_argument("--before", help="the earlier checkout for hexgen-before (e.g. `git worktree add /tmp/main main`)")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--ttft-concurrency", type=int, default=32)
    parser.add_argument("--batch1-requests", type=int, default=3, help="requests alone, for batch-1 figures")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--hexgen-engine", default="{}",
                        help="JSON of extra hexgen engine fields, e.g. '{\"max_num_batched_tokens\": 4096}'")
    parser.add_argument("--startup-seconds", type=float, default=900, help="vLLM compiles for minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if "hexgen-before" in args.servers and not args.before:
        parser.error("hexgen-before needs --before CHECKOUT")

    vocab_size = json.loads((resolve_model_dir("default") / "config.json").read_text())["vocab_size"]
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    print(f"logs in {workdir}; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    results = []
    for dtype in args.dtypes:
        for name in args.servers:
            if not is_set_up(name):
                results.append(Result(name, dtype, note=f"not set up: run benchmarks/peers/setup.sh {name}"))
                continue
            server = start(name, dtype, free_port(), workdir, args)
            try:
                server.wait_ready(args.startup_seconds)
                results.append(measure(server, dtype, args, rng, vocab_size))
            except (RuntimeError, httpx.HTTPError, AssertionError) as err:
                results.append(Result(name, dtype, note=f"failed: {str(err)[:200]}"))
                print(f"  {name} {dtype} failed: {err}", flush=True)
            finally:
                server.stop()
    print()
    print(f"{args.prompt_len} prompt tokens, {args.output_len} output tokens (ignore_eos, greedy), "
          f"prefix caching off, {NUM_THREADS} threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(format_table(results, args.concurrency, args.ttft_concurrency))
    print(ratios(results, args.concurrency))
    print(format_cpu_split(results, args.ttft_concurrency))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    if all(not r.note for r in results):  # else the servers' logs stay for a look
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
