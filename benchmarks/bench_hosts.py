"""One two-stage deployment with its stages on one host, then on two hosts over shaped links: measured against predicted.

SmolLM2-135M as two stages of 15 layers, TP 1 each, one replica, 2 micro-batches, one thread per worker. Cases:
both stages on the head (no link), then stage 0 on the head and stage 1 on host `a` (devices `cpu`, `a/cpu`), the
head <-> a link shaped to 1000, 100 and 20 Mbit/s. Hosts are network namespaces of planning/emulation/harness.py sharing
this machine's cores (compute is not split, only links); `a` runs `hexgen node`, the head runs the offline engine
(hexcore LLM) in a script inside its namespace, so the figures are engine figures, not HTTP.

Per case, over a fixed offline workload (N concurrent random prompts, greedy, ignore_eos, after a warm-up):
- output tokens/s (first request added -> last token) and TPOT (per request: (last - first token) / (n - 1), median);
- the link's bytes per engine step and per output token: the head's eth0 rx + tx counters (headers included),
  split by plane from the head's TCP sockets (payload, tcp_info): control = the cluster channel (port 8478: the
  driver's step message to the remote worker, its StepResult back, heartbeats), data = gloo between the stages
  (hidden states), store = the c10d store; plus the mean pickled step message (one per role: here stage 0's and
  stage 1's) the driver sends per step (per rank: benchmarks/bench_step_bytes.py);
- the planner's prediction: the cost model's replicas (planning.replica_costs on a cluster file with the link's
  bandwidth) simulated on the same requests, all arriving at once (planning.simulate).

    .venv/bin/python -m benchmarks.bench_hosts [--requests 16] [--prompt-len 64] [--output-len 64] [--rounds 2]
                                               [--json FILE]

Needs root (network namespaces, tc). Cases run in each round, the order reversed every other round, so that a drift
of the machine's speed hits every case alike; the table gives the medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-hosts-cluster-token-0123456789"
PORT = 8478
LAYERS = (15, 15)
DEVICE_FILE = REPO / "configs" / "devices" / "local-cpu.yaml"
LINK_LATENCY_MS = 0.1  # the emulated link has no latency of its own: veth + bridge, ~0.05-0.1 ms
CASES = [("one host", None), ("1 Gbit/s", 1000.0), ("100 Mbit/s", 100.0), ("20 Mbit/s", 20.0)]


def engine_section(requests: int, prompt_len: int, output_len: int) -> dict:
    blocks = requests * -(-(prompt_len + output_len) // 16)
    return {"num_micro_batches": 2, "num_threads_per_worker": 1, "enable_prefix_caching": False,
            "num_kv_blocks": 2 * blocks + 16, "block_size": 16, "max_num_batched_tokens": 512}


def deployment(remote: bool, engine: dict, head_address: str, head_name: str = "head", planner: bool = False) -> dict:
    """The deployment file: `cpu` / `a/cpu` for the engine; the planner needs every device's node named."""
    first = f"{head_name}/cpu" if planner else "cpu"
    second = "a/cpu" if remote else first
    raw = {"model": "default", "replicas": [{"name": "r0", "stages": [
        {"devices": [first], "layers": LAYERS[0]}, {"devices": [second], "layers": LAYERS[1]}]}], "engine": engine}
    if not planner:
        raw["cluster"] = {"node_name": head_name, "host": head_address, "port": PORT, "join_timeout_seconds": 60}
    return raw


def make_prompts(requests: int, prompt_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(prompt_len)] for _ in range(requests)]


# ------------------------------------------------------------------------------------- inside the head's namespace

class _CountingPickle:
    """Stands in for `pickle` in hexcore.executor.replica_workers: counts the step message bytes the driver
    pickles (once per role per step, then sent to every worker of that role) at no extra cost."""

    HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL

    def __init__(self):
        self.bytes = 0
        self.calls = 0

    def dumps(self, obj, protocol=None):
        data = pickle.dumps(obj, protocol=protocol)
        self.bytes += len(data)
        self.calls += 1
        return data

    def __getattr__(self, name):
        return getattr(pickle, name)


def link_counters() -> dict:
    out = subprocess.run(["ip", "-s", "-j", "link", "show", "eth0"], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout)[0]["stats64"]
    return {"rx_bytes": stats["rx"]["bytes"], "tx_bytes": stats["tx"]["bytes"],
            "rx_packets": stats["rx"]["packets"], "tx_packets": stats["tx"]["packets"]}


_ADDR = re.compile(r"^(.*):(\d+)$")


def _split(endpoint: str) -> tuple[str, int]:
    host, port = _ADDR.match(endpoint).groups()
    host = host.strip("[]")
    if host.startswith("::ffff:"):
        host = host[len("::ffff:"):]
    return host, int(port)


def tcp_sockets() -> dict[tuple, dict]:
    """Every established TCP socket of this namespace: (local, peer) -> owner pid and tcp_info byte counters."""
    out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True, text=True, check=True).stdout
    sockets, current = {}, None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            fields = line.split()
            # with a state filter ss omits the state column: Recv-Q Send-Q Local Peer users:(...)
            local, peer = _split(fields[2]), _split(fields[3])
            pid = re.search(r"pid=(\d+)", line)
            current = (local, peer)
            sockets[current] = {"pid": int(pid.group(1)) if pid else None, "acked": 0, "received": 0}
        elif current is not None:
            for key, name in (("acked", "bytes_acked"), ("received", "bytes_received")):
                found = re.search(rf"\b{name}:(\d+)", line)
                if found:
                    sockets[current][key] = int(found.group(1))
    return sockets


def plane_bytes(before: dict, after: dict, peer: str | None, store_port: int, driver_pid: int) -> dict:
    """Payload bytes per plane between two snapshots. Across hosts: the head's sockets to `peer`, sent + received
    (both directions of the link). On one host: the workers' sockets among themselves, sent only (each byte once)."""
    planes = {"control": 0, "data": 0, "store": 0}
    for key, now in after.items():
        (local_host, local_port), (peer_host, peer_port) = key
        if peer is not None:
            if peer_host != peer:
                continue
        elif now["pid"] == driver_pid or not peer_host.startswith("127."):
            continue  # one host: only worker <-> worker (and worker -> store) sockets on loopback
        then = before.get(key, {"acked": 0, "received": 0})
        moved = now["acked"] - then["acked"] + (now["received"] - then["received"] if peer is not None else 0)
        if PORT in (local_port, peer_port):
            planes["control"] += moved
        elif store_port in (local_port, peer_port):
            planes["store"] += moved
        else:
            planes["data"] += moved
    return planes


def inner(args) -> None:
    """One case: start the engine from the deployment file, warm up, run the workload, print RESULT {json}."""
    from hexcore.config import load_config
    from hexcore.engine.llm import LLM
    from hexcore.executor import replica_workers
    from hexcore.sampling_params import SamplingParams

    counter = _CountingPickle()
    replica_workers.pickle = counter
    config = load_config(args.inner)
    prompts = make_prompts(args.requests, args.prompt_len, args.seed)
    warm = make_prompts(args.requests, args.prompt_len, args.seed + 1)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    started = time.perf_counter()
    with LLM(config) as llm:
        load_seconds = time.perf_counter() - started
        core = llm.core
        llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        store_port = int(core.rendezvous.address.rsplit(":", 1)[1])
        steps0, pickled0, calls0 = core.stats().replicas[0].num_steps, counter.bytes, counter.calls
        link0, sockets0 = link_counters(), tcp_sockets()
        first, last, count = {}, {}, {}
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            core.add_request(f"b{i}", prompt, params)
        while core.has_unfinished:
            outputs = core.step(timeout=1.0)
            now = time.perf_counter()
            for out in outputs:
                if out.error is not None:
                    raise RuntimeError(f"request {out.request_id}: {out.error.message}")
                n = sum(len(choice.token_ids) for choice in out.choices)
                if n:
                    first.setdefault(out.request_id, now)
                    last[out.request_id] = now
                    count[out.request_id] = count.get(out.request_id, 0) + n
        elapsed = max(last.values()) - t0
        link1, sockets1 = link_counters(), tcp_sockets()
        steps = core.stats().replicas[0].num_steps - steps0
        step_batches = counter.calls - calls0
        step_batch_bytes = counter.bytes - pickled0
        core.collect_worker_stats()
        busy = core.stats().replicas[0].stage_busy_fraction
    tokens = sum(count.values())
    tpots = [(last[r] - first[r]) / (count[r] - 1) for r in count if count[r] > 1]
    ttfts = [first[r] - t0 for r in first]
    link = {k: link1[k] - link0[k] for k in link0}
    planes = plane_bytes(sockets0, sockets1, args.peer, store_port, os.getpid())
    print("RESULT " + json.dumps({
        "load_seconds": round(load_seconds, 1), "seconds": elapsed, "output_tokens": tokens,
        "tokens_per_second": tokens / elapsed, "tpot_ms": 1000 * statistics.median(tpots),
        "ttft_ms": 1000 * statistics.median(ttfts), "steps": steps, "link": link, "planes": planes,
        "step_batch_bytes": step_batch_bytes / max(1, step_batches), "stage_busy_fraction": busy,
        "load_average": os.getloadavg()[0]}), flush=True)


# ------------------------------------------------------------------------------------------------- the planner

def predict(mbit: float | None, requests: int, prompt_len: int, output_len: int) -> dict:
    """The cost model's replica on a cluster file with the link's bandwidth, simulated on the same requests."""
    from hexcore.config import parse_config
    from planning import load_model, replica_costs, simulate
    from planning.inputs.cluster import ClusterSpec, build_cluster
    from planning.inputs.workload import Request, WorkloadSpec
    from planning.placement import plan_from_config

    links = {"intra_node": str(DEVICE_FILE)}
    if mbit is not None:
        links["inter_site"] = {"bandwidth_gbps": mbit / 1000, "latency_ms": LINK_LATENCY_MS}
    spec = ClusterSpec.model_validate({
        "gpus": {"local-cpu": str(DEVICE_FILE)},
        "nodes": [{"name": "head", "gpu": "local-cpu", "count": 2}, {"name": "a", "gpu": "local-cpu", "count": 1}],
        "links": links})
    cluster = build_cluster(spec, REPO)
    config = parse_config(deployment(mbit is not None, engine_section(requests, prompt_len, output_len), "",
                                     planner=True))
    model = load_model("smollm2-135m").with_dtype(config.dtype)
    costs = replica_costs(cluster, model, config, plan_from_config(config, cluster))
    workload = WorkloadSpec(rate=1e6, prompt_len=prompt_len, output_len=output_len, slo_seconds=1e6,
                            num_requests=requests)
    predicted = simulate(costs, workload, [Request(0.0, prompt_len, output_len)] * requests, capacities=[1.0])
    link = costs[0].send_links[0]
    hidden_bytes_per_token = model.hidden_size * model.dtype_bytes
    return {"tokens_per_second": predicted.throughput_rps * output_len, "tpot_ms": 1000 * predicted.p50_tpot_s,
            "ttft_ms": 1000 * predicted.p50_ttft_s, "link_gbps": link.bandwidth_gbps,
            "hidden_bytes_per_token": hidden_bytes_per_token}


# -------------------------------------------------------------------------------------------------- the driver

def run_case(cluster, name: str, mbit: float | None, path: Path, args) -> dict:
    env = {**os.environ, "HEXGEN_CLUSTER_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    agent = None
    if mbit is not None:
        cluster.set_bandwidth("head", "a", mbit)
        agent = cluster.popen("a", [sys.executable, "-m", "server.entrypoint", "node", "--head",
                                    f"{cluster.address('head')}:{PORT}", "--name", "a"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    argv = [sys.executable, "-m", "benchmarks.bench_hosts", "--inner", str(path), "--requests", str(args.requests),
            "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len), "--seed", str(args.seed)]
    if mbit is not None:
        argv += ["--peer", cluster.address("a")]
    try:
        run = cluster.run("head", argv, env=env, cwd=REPO, timeout=1800)
    finally:
        if agent is not None:
            agent.kill()
            agent.wait(timeout=30)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"case {name!r} failed (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarize(name: str, mbit: float | None, runs: list[dict], prediction: dict, args) -> dict:
    med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
    steps = med(lambda r: r["steps"])
    tokens = med(lambda r: r["output_tokens"])
    link_bytes = med(lambda r: r["link"]["rx_bytes"] + r["link"]["tx_bytes"])
    processed = args.requests * args.prompt_len + args.requests * (args.output_len - 1)  # tokens through stage 0
    return {
        "case": name, "mbit": mbit, "rounds": len(runs),
        "tokens_per_second": med(lambda r: r["tokens_per_second"]),
        "predicted_tokens_per_second": prediction["tokens_per_second"],
        "tpot_ms": med(lambda r: r["tpot_ms"]), "predicted_tpot_ms": prediction["tpot_ms"],
        "ttft_ms": med(lambda r: r["ttft_ms"]), "predicted_ttft_ms": prediction["ttft_ms"],
        "steps": steps,
        "link_bytes_per_step": link_bytes / steps, "link_bytes_per_output_token": link_bytes / tokens,
        "link_packets_per_step": med(lambda r: r["link"]["rx_packets"] + r["link"]["tx_packets"]) / steps,
        "control_bytes_per_step": med(lambda r: r["planes"]["control"]) / steps,
        "data_bytes_per_step": med(lambda r: r["planes"]["data"]) / steps,
        "store_bytes_per_step": med(lambda r: r["planes"]["store"]) / steps,
        "step_batch_bytes": med(lambda r: r["step_batch_bytes"]),
        "hidden_state_bytes_per_step": processed * prediction["hidden_bytes_per_token"] / steps,
        "per_round": runs, "prediction": prediction,
    }


def print_table(rows: list[dict]) -> None:
    base = rows[0] if rows and rows[0]["mbit"] is None else None
    print(f"\n{'case':<11} {'tok/s':>6} {'pred':>6} {'rel':>5} {'pred':>5} {'TPOT ms':>8} {'pred':>6} "
          f"{'TTFT ms':>8} {'pred':>6} {'steps':>5} {'link B/step':>11} {'ctrl B/step':>11} {'data B/step':>11} "
          f"{'model B/step':>12} {'B/out tok':>9} {'step msg B':>11}")
    for r in rows:
        rel = r["tokens_per_second"] / base["tokens_per_second"] if base else float("nan")
        rel_pred = r["predicted_tokens_per_second"] / base["predicted_tokens_per_second"] if base else float("nan")
        print(f"{r['case']:<11} {r['tokens_per_second']:>6.1f} {r['predicted_tokens_per_second']:>6.1f} "
              f"{rel:>5.2f} {rel_pred:>5.2f} {r['tpot_ms']:>8.1f} {r['predicted_tpot_ms']:>6.1f} "
              f"{r['ttft_ms']:>8.0f} {r['predicted_ttft_ms']:>6.0f} {r['steps']:>5.0f} "
              f"{r['link_bytes_per_step']:>11.0f} {r['control_bytes_per_step']:>11.0f} "
              f"{r['data_bytes_per_step']:>11.0f} {r['hidden_state_bytes_per_step']:>12.0f} "
              f"{r['link_bytes_per_output_token']:>9.0f} {r['step_batch_bytes']:>11.0f}")
    print("rel: tok/s over the one-host case's (measured, predicted). link B/step: head eth0 rx+tx (headers\n"
          "included); ctrl / data: TCP payload on the cluster channel (8478) / gloo between the stages (one host:\n"
          "over loopback, not a link); model B/step: the hidden states the cost model sends (tokens x 576 x 4);\n"
          "step msg B: mean pickled step message per role (stage 0's, stage 1's) the driver sends per step.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=[name for name, _ in CASES], help="run only these cases")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--inner", help=argparse.SUPPRESS)  # a deployment file: run one case (head namespace)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args)
        return

    from planning.emulation.harness import EmulatedCluster, skip_reason

    reason = skip_reason()
    if reason is not None:
        sys.exit(f"cannot emulate hosts here: {reason}")
    cases = [(name, mbit) for name, mbit in CASES if not args.only or name in args.only]
    engine = engine_section(args.requests, args.prompt_len, args.output_len)
    predictions = {name: predict(mbit, args.requests, args.prompt_len, args.output_len) for name, mbit in cases}
    results: dict[str, list[dict]] = {name: [] for name, _ in cases}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="bench-hosts-") as tmp, EmulatedCluster(["head", "a"]) as cluster:
        paths = {}
        for name, mbit in cases:
            paths[name] = Path(tmp) / f"{name.replace(' ', '-').replace('/', '')}.yaml"
            paths[name].write_text(yaml.safe_dump(deployment(mbit is not None, engine, cluster.address("head"))))
        for round_index in range(args.rounds):
            order = cases if round_index % 2 == 0 else cases[::-1]
            for name, mbit in order:
                result = run_case(cluster, name, mbit, paths[name], args)
                results[name].append(result)
                print(f"round {round_index + 1} {name:<11} {result['tokens_per_second']:6.1f} tok/s  TPOT "
                      f"{result['tpot_ms']:6.1f} ms  {result['steps']} steps  link "
                      f"{result['link']['rx_bytes'] + result['link']['tx_bytes']} B  planes {result['planes']}  "
                      f"(load {result['load_average']:.2f})", flush=True)
    rows = [summarize(name, mbit, results[name], predictions[name], args) for name, mbit in cases]
    print(f"\n{args.requests} requests x {args.prompt_len} prompt x {args.output_len} output tokens, "
          f"medians of {args.rounds} rounds, started {started}")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started, "requests": args.requests,
                                               "prompt_len": args.prompt_len, "output_len": args.output_len,
                                               "rounds": args.rounds, "cases": rows}, indent=2))


if __name__ == "__main__":
    main()
