"""Structured outputs: what a grammar costs (BENCHMARKS.md, "Structured outputs").

1. Compile: for each of the 50 test schemas (tests/server/structured_cases.py) and a large one, the time
   the sampling worker spends to make it usable (llguidance matcher + first mask), and the edge's
   validation; the tokenizer load, once per worker.
2. Mask: the time the worker adds to one step for 32 constrained rows (advance each matcher by one
   token, compute and unpack its mask), measured in this process.
3. Engine: 32 concurrent chat requests on SmolLM2-135M (one TP1 replica), greedy, each with its JSON
   Schema, then the same prompts unconstrained with ignore_eos and each request's constrained token
   count as max_tokens: same tokens to compute, so the tokens/s ratio is the mask's cost.

    PYTHONPATH=. python benchmarks/bench_structured.py [--skip-engine]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from hexcore.grammar import closed_objects, grammar_error, json_schema_spec
from hexcore.model.files import resolve_model_dir
from tests.server.structured_cases import schema_cases

NUM_REQUESTS = 32


def big_schema(num_properties: int = 40) -> dict:
    item = {"type": "object", "properties": {"x": {"type": "array", "items": {"enum": ["a", "b", "c"]}},
                                             "y": {"type": "number"}, "z": {"type": "string", "maxLength": 30}},
            "required": ["x", "y"]}
    return {"type": "object", "properties": {f"p{i}": item for i in range(num_properties)},
            "required": [f"p{i}" for i in range(num_properties)]}


def bench_compile(model_dir) -> None:
    from hexcore.worker.grammar import GrammarMatchers

    started = time.perf_counter()
    matchers = GrammarMatchers(model_dir, 49152)
    tokenizer = matchers._tokenizer.result()
    print(f"tokenizer load (once per sampling worker, in the background at start): {time.perf_counter() - started:.2f} s")
    specs = [json_schema_spec(closed_objects(schema)) for schema, _ in schema_cases()]
    validate, compile_ = [], []
    for spec in specs:
        t0 = time.perf_counter()
        assert grammar_error(spec) is None
        validate.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        matchers._compile(spec)
        compile_.append(time.perf_counter() - t0)
    print(f"50 test schemas: edge validation median {1e3 * statistics.median(validate):.2f} ms, "
          f"max {1e3 * max(validate):.2f} ms; worker compile (matcher + first mask) median "
          f"{1e3 * statistics.median(compile_):.1f} ms, max {1e3 * max(compile_):.1f} ms")
    big = json_schema_spec(big_schema())
    t0 = time.perf_counter()
    matchers._compile(big)
    print(f"a 40-property nested schema ({len(big.source)} characters): worker compile {1e3 * (time.perf_counter() - t0):.1f} ms")
    del tokenizer
    bench_mask(matchers, specs)


def bench_mask(matchers, specs) -> None:
    """32 rows, each one token further every round, as in decoding: the worker's added time per step."""
    from hexcore.executor.messages import SeqSampling
    from hexcore.sampling_params import SamplingParams
    from hexcore.worker.sampler import sample

    specs = (specs * 2)[:NUM_REQUESTS]
    outputs = [[] for _ in specs]
    for spec in specs:
        matchers.compiled(spec).result()
    generator = torch.Generator().manual_seed(0)
    step_seconds, sample_seconds = [], []
    for _ in range(60):
        rows = [SeqSampling(SamplingParams(temperature=0.0, grammar=spec), 0, len(out), output_token_ids=tuple(out),
                            seq_id=i) for i, (spec, out) in enumerate(zip(specs, outputs))]
        logits = torch.randn(len(rows), 49152, generator=generator)
        t0 = time.perf_counter()
        masks = matchers.allowed(rows)
        t1 = time.perf_counter()
        tokens = sample(logits, rows, masks)
        t2 = time.perf_counter()
        step_seconds.append(t1 - t0)
        sample_seconds.append(t2 - t1)
        eos = matchers._tokenizer.result().eos_token
        for out, token in zip(outputs, tokens):
            if token.token_id != eos:
                out.append(token.token_id)
    print(f"mask for {NUM_REQUESTS} constrained rows per step (advance + compute + unpack): median "
          f"{1e3 * statistics.median(step_seconds):.2f} ms ({1e3 * statistics.median(step_seconds) / NUM_REQUESTS:.3f} ms "
          f"a row); sampling them with the masks: median {1e3 * statistics.median(sample_seconds):.2f} ms")


def bench_engine(model_dir) -> None:
    from transformers import AutoTokenizer

    from hexcore.config import parse_config
    from hexcore.engine.llm import LLM
    from hexcore.sampling_params import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cases = schema_cases()[:NUM_REQUESTS]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for _, prompt in cases]
    config = parse_config({"model": "default", "replicas": [{"stages": [{"devices": ["cpu"], "layers": 30}]}],
                           "engine": {"num_kv_blocks": 1024, "max_num_seqs": NUM_REQUESTS}})
    with LLM(config) as llm:
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4))  # warm
        constrained = [SamplingParams(temperature=0.0, max_tokens=300, grammar=json_schema_spec(closed_objects(s)))
                       for s, _ in cases]
        runs = []
        for round_ in range(2):
            t0 = time.perf_counter()
            results = llm.generate(prompts, constrained)
            with_schema = time.perf_counter() - t0
            counts = [len(r.token_ids) for r in results]
            plain = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in counts]
            t0 = time.perf_counter()
            llm.generate(prompts, plain)
            without = time.perf_counter() - t0
            runs.append((sum(counts), with_schema, without))
            print(f"round {round_}: {sum(counts)} tokens; with JSON Schema {sum(counts) / with_schema:.1f} tokens/s "
                  f"({with_schema:.1f} s), without {sum(counts) / without:.1f} tokens/s ({without:.1f} s)")
        ratio = statistics.median(w / wo for _, w, wo in runs)
        print(f"{NUM_REQUESTS} concurrent requests: time with a schema / without = {ratio:.3f} (median of rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-engine", action="store_true", help="only the compile and mask measurements")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}")
    model_dir = resolve_model_dir("default")
    bench_compile(model_dir)
    if not args.skip_engine:
        bench_engine(model_dir)


if __name__ == "__main__":
    main()
