"""Bytes the driver sends each rank per engine step, before and after per-rank step messages (issue 16).

One replica of SmolLM2-135M as three stages [TP1 -> TP1 -> TP3] (10 layers each; every role: first stage,
middle, last-stage sampling rank, last-stage ranks that only join the logits gather), 2 micro-batches, one
fixed workload: N random prompts at once, three times: greedy (ignore_eos), sampled with presence, frequency and
repetition penalties (ignore_eos), and seeded top-p sampling with min_tokens, logprobs and prompt logprobs. The
generated tokens and logprobs of each are fingerprinted: they must be the same before and after. The bytes are the driver's step payloads per rank, counted at the pipe
(`Connection.send_bytes`), attributed to each step as the replica submits it; a step is a prefill step when
some sequence brings more than one token. Bytes are exact and repeatable, not timed.

"before" is the code at BEFORE_COMMIT (the whole pickled StepBatch to every rank), exported from git into a
temporary directory and run in a subprocess with it first on the path; "after" is this tree.

    .venv/bin/python benchmarks/bench_step_bytes.py [--requests 16] [--prompt-len 64] [--output-len 64]
                                                    [--before-commit SHA]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "403734a"  # main before issue 16
STAGES = [(1, 10), (1, 10), (3, 10)]  # (TP, layers)
ROLES = {0: "first stage", 1: "middle stage", 2: "last, sampling rank", 3: "last, TP rank 1", 4: "last, TP rank 2"}


def make_prompts(requests: int, prompt_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(prompt_len)] for _ in range(requests)]


def fingerprint(results) -> str:
    """The generated tokens and every logprob (6 decimals), hashed: equal before and after or not."""
    def rounded(logprobs):
        return [None if t is None else (t.token_id, round(t.logprob, 6), sorted((k, round(v, 6)) for k, v in t.top.items()))
                for t in logprobs or []]

    outputs = [(c.token_ids, rounded(c.logprobs), rounded(r.prompt_logprobs)) for r in results for c in r.completions]
    return hashlib.sha256(json.dumps(outputs).encode()).hexdigest()[:16]


def inner(args) -> None:
    """Run the workloads on whatever `hexcore` is first on the path; print RESULT {json}."""
    from multiprocessing.connection import Connection

    from hexcore.config import parse_config
    from hexcore.engine.llm import LLM
    from hexcore.sampling_params import SamplingParams

    raw = {"model": "default", "engine": {"num_micro_batches": 2, "num_threads_per_worker": 1,
                                          "enable_prefix_caching": False, "max_num_batched_tokens": 512},
           "replicas": [{"name": "r0", "stages": [{"devices": ["cpu"] * tp, "layers": layers}
                                                  for tp, layers in STAGES]}]}
    sends: list[tuple[Connection, int]] = []
    send_bytes = Connection.send_bytes

    def counting_send_bytes(self, buf, *rest):
        sends.append((self, len(buf)))
        return send_bytes(self, buf, *rest)

    Connection.send_bytes = counting_send_bytes
    workloads = {"greedy": SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True),
                 "penalties": SamplingParams(temperature=0.8, max_tokens=args.output_len, ignore_eos=True,
                                             presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1, seed=1),
                 "seeded, min_tokens, logprobs": SamplingParams(temperature=1.0, top_p=0.9, seed=7, min_tokens=8,
                                                                max_tokens=args.output_len, logprobs=2,
                                                                prompt_logprobs=1)}
    results = {}
    with LLM(parse_config(raw)) as llm:
        replica = llm.core.replicas[0]
        rank_of = {conn: rank for rank, conn in enumerate(replica.workers.conns)}
        steps: list[dict] = []

        def record(batch) -> None:
            per_rank = [0] * len(rank_of)
            for conn, num_bytes in sends:
                per_rank[rank_of[conn]] += num_bytes
            sends.clear()
            steps.append({"prefill": max(batch.query_lens) > 1, "bytes": per_rank})

        replica.step_observers.append(record)
        for name, params in workloads.items():
            sends.clear()
            steps.clear()
            prompts = make_prompts(args.requests, args.prompt_len, args.seed)
            results[name] = {"outputs": fingerprint(llm.generate(prompts, params))}
            results[name] |= {kind: {"steps": len(chosen),
                                    "bytes": [statistics.mean(s["bytes"][r] for s in chosen) if chosen else 0.0
                                              for r in range(len(rank_of))]}
                             for kind, chosen in (("prefill", [s for s in steps if s["prefill"]]),
                                                  ("decode", [s for s in steps if not s["prefill"]]))}
    print("RESULT " + json.dumps(results), flush=True)


def run(pythonpath: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, str(Path(__file__).resolve()), "--inner", "--requests", str(args.requests),
            "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len), "--seed", str(args.seed)]
    out = subprocess.run(argv, env=env, cwd=pythonpath, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"the {pythonpath} run failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def export(commit: str, directory: Path) -> None:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--before-commit", default=BEFORE_COMMIT)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return inner(args)
    with tempfile.TemporaryDirectory(prefix="hexgen-before-") as before_tree:
        export(args.before_commit, Path(before_tree))
        before = run(Path(before_tree), args)
    after = run(REPO, args)
    print(f"{args.requests} requests x {args.prompt_len} prompt + {args.output_len} output tokens, "
          f"stages [TP1 -> TP1 -> TP3] (SmolLM2-135M), 2 micro-batches; mean bytes the driver sends per step")
    for workload in before:
        for kind in ("prefill", "decode"):
            b, a = before[workload][kind], after[workload][kind]
            print(f"\n{workload}, {kind} steps (before {b['steps']}, after {a['steps']}):")
            print(f"  {'rank':<4} {'role':<22} {'before B':>9} {'after B':>8} {'after/before':>12}")
            for rank, role in ROLES.items():
                ratio = a["bytes"][rank] / b["bytes"][rank] if b["bytes"][rank] else float("nan")
                print(f"  {rank:<4} {role:<22} {b['bytes'][rank]:>9.0f} {a['bytes'][rank]:>8.0f} {ratio:>12.2f}")
            total_b, total_a = sum(b["bytes"]), sum(a["bytes"])
            print(f"  {'all':<4} {'':<22} {total_b:>9.0f} {total_a:>8.0f} {total_a / total_b:>12.2f}")
        same = before[workload]["outputs"] == after[workload]["outputs"]
        print(f"{workload}: output tokens {'identical' if same else 'DIFFERENT'} before and after")


if __name__ == "__main__":
    main()
