"""Load time and per-token decode time of one request, for several TP/PP layouts of one model.

For each layout: worker start-up and model load (seconds until every worker is ready), time to the
first token of a 32-token prompt, and the mean time per output token while decoding 64 tokens alone
(batch 1: the latency floor a layout gives). Where the time goes: per-step latency as the driver sees
it and each stage's busy share. Run from the repository root:

    .venv/bin/python -m benchmarks.bench_layouts [--model tiny|default] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from hexcore.config import parse_config
from hexcore.engine.llm import LLM
from hexcore.sampling_params import SamplingParams

LAYOUTS = {
    "tiny": {"TP1": [(1, 8)], "[TP2, TP1]": [(2, 5), (1, 3)], "[TP1, TP1]": [(1, 4), (1, 4)]},
    # SmolLM2 has 3 KV heads: TP 2 does not divide them, TP 3 does
    "default": {"TP1": [(1, 30)], "[TP1, TP1]": [(1, 15), (1, 15)],
                "[TP3, TP1]": [(3, 20), (1, 10)]},
}
PROMPT = list(range(100, 132))
NUM_DECODE_TOKENS = 64


def measure(model: str, stages: list[tuple[int, int]]) -> dict:
    config = parse_config({"model": model, "replicas": [{"stages": [
        {"devices": ["cpu"] * tp, "layers": layers} for tp, layers in stages]}], "engine": {"num_kv_blocks": 64}})
    started = time.perf_counter()
    with LLM(config) as llm:
        load_seconds = time.perf_counter() - started
        llm.generate([PROMPT], SamplingParams(max_tokens=2))  # warm-up
        first = time.perf_counter()
        llm.generate([PROMPT], SamplingParams(max_tokens=1))
        ttft = time.perf_counter() - first
        before = llm.core.stats().replicas[0]
        decode_start = time.perf_counter()
        llm.generate([PROMPT], SamplingParams(max_tokens=NUM_DECODE_TOKENS, temperature=0, ignore_eos=True))
        decode_seconds = time.perf_counter() - decode_start - ttft
        llm.core.collect_worker_stats()
        after = llm.core.stats().replicas[0]
        num_steps = after.num_steps - before.num_steps
        return {"load_seconds": round(load_seconds, 2), "ttft_ms": round(ttft * 1000, 1),
                "ms_per_token": round(decode_seconds / (NUM_DECODE_TOKENS - 1) * 1000, 2),
                "driver_step_ms": round(after.mean_step_seconds * 1000, 2), "steps": num_steps,
                "stage_busy_fraction": [round(f, 2) for f in after.stage_busy_fraction],
                "load_average": round(os.getloadavg()[0], 2)}


def tiny_model_dir() -> str:
    from tests.conftest import build_tiny_llama

    return str(build_tiny_llama(Path(tempfile.mkdtemp(prefix="hexgen-tiny-"))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(LAYOUTS), default="default")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    model = tiny_model_dir() if args.model == "tiny" else "default"
    rows = {name: measure(model, stages) for name, stages in LAYOUTS[args.model].items()}
    print(f"{'layout':<12} {'load s':>7} {'TTFT ms':>8} {'ms/token':>9} {'step ms':>8}  stage busy  (load avg)")
    for name, row in rows.items():
        print(f"{name:<12} {row['load_seconds']:>7} {row['ttft_ms']:>8} {row['ms_per_token']:>9} "
              f"{row['driver_step_ms']:>8}  {row['stage_busy_fraction']}  ({row['load_average']})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
