"""Where one engine step spends its time, replayed in a single process (no workers, no IPC).

Builds one rank's StageRunner holding every SmolLM2 layer (TP1) exactly as a worker does, then runs
the step shapes of the benchmark in bench_engine.py: a decode step of B sequences at context C, and a
prefill step of the token budget. torch.profiler attributes each aten op's self time to a category
(linear, KV gather, attention, cache write, norms/rope/activation, sampling); the rest of the step's
wall time is Python. The driver's per-step work (building and pickling a step message, detokenizing)
and what the profiler cannot see (IPC) are timed separately.

    .venv/bin/python -m benchmarks.profile_engine_step [--threads 2] [--batch 32] [--context 192] [--compare-unfused]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from hexcore.executor.messages import SeqSampling, StepBatch
from hexcore.model.files import resolve_model_dir
from hexcore.model.llama import LlamaDims, read_model_config
from hexcore.sampling_params import SamplingParams
from hexcore.worker.stage_runner import StageRunner, single_rank_runner

BLOCK_SIZE = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)

# aten op name -> category; first matching prefix wins (self CPU time is summed per category).
CATEGORIES = (
    ("fused layer halves (all of a half's work)", ("hexcore::attention_block", "hexcore::mlp_block")),
    ("linear (matmul)", ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear",
                         "mkldnn::_linear_pointwise", "hexcore::linear")),
    ("KV gather (cache[block_tables])", ("aten::index",)),
    ("attention (SDPA, or the CPU kernel)", ("hexcore::paged_decode_attention", "aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_softmax",
                          "aten::softmax", "aten::baddbmm", "aten::masked_fill", "aten::where",
                          "aten::logical_not", "aten::_safe_softmax")),
    ("cache write (index_copy_)", ("aten::index_copy", "aten::index_put", "aten::_index_put")),
    ("copies / reshapes", ("aten::copy_", "aten::contiguous", "aten::clone", "aten::reshape", "aten::view",
                           "aten::transpose", "aten::expand", "aten::unsqueeze", "aten::squeeze",
                           "aten::_unsafe_view", "aten::empty", "aten::as_strided", "aten::slice",
                           "aten::split", "aten::chunk", "aten::narrow", "aten::select", "aten::t",
                           "aten::to", "aten::_to_copy", "aten::empty_like", "aten::resize_",
                           "aten::detach", "aten::alias", "aten::lift_fresh")),
    ("elementwise (norm, rope, silu, residual)", ("hexcore::rms_norm", "hexcore::silu_and_mul", "aten::mul",
                                                 "aten::add", "aten::cat", "aten::neg", "aten::rsqrt",
                                                 "aten::pow", "aten::mean", "aten::silu", "aten::sub",
                                                 "aten::div")),
    ("sampling (argmax)", ("aten::argmax", "aten::max")),
    ("embedding", ("aten::embedding",)),
)


def categorise(name: str) -> str:
    for category, prefixes in CATEGORIES:
        if name.startswith(prefixes):
            return category
    return "other ops"


def _label_compiled_loops(runner: StageRunner) -> None:
    """hexcore's compiled C++ loops (linear layers, decode attention, RMSNorm, SiLU-and-mul, fused layer
    halves) are no torch ops: name them for the profiler here, so that the engine's own hot path carries
    no labels."""
    from types import SimpleNamespace

    from hexcore.kernels.elementwise import ElementwiseKernels
    from hexcore.model.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelLMHead
    from hexcore.model.llama import FusedLlamaDecoderLayer, LlamaMLP, RMSNorm

    def labelled(name, fn):
        def call(*args):
            with torch.profiler.record_function(name):
                return fn(*args)
        return call

    for module in runner.model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelLMHead)):
            module.matmul = labelled("hexcore::linear", module.matmul)  # whichever kernel it chose
    if runner.decode_kernel is not None:
        runner.decode_kernel = labelled("hexcore::paged_decode_attention", runner.decode_kernel)
    for module in runner.model.modules():
        if isinstance(module, FusedLlamaDecoderLayer):
            module.kernels = SimpleNamespace(
                attention_block=labelled("hexcore::attention_block", module.kernels.attention_block),
                mlp_block=labelled("hexcore::mlp_block", module.kernels.mlp_block))
    modules = [m for m in runner.model.modules() if isinstance(m, (RMSNorm, LlamaMLP)) and m.kernels is not None]
    if modules:
        kernels = modules[0].kernels
        named = ElementwiseKernels(labelled("hexcore::rms_norm", kernels.rms_norm),
                                   labelled("hexcore::silu_and_mul", kernels.silu_and_mul))
        for module in modules:
            module.kernels = named


def build_runner(num_blocks: int, max_model_len: int) -> tuple[StageRunner, LlamaDims]:
    model_dir = resolve_model_dir("default")
    dims, _rope = read_model_config(model_dir)
    runner = single_rank_runner(model_dir, dims.num_layers, "float32", num_blocks, BLOCK_SIZE, max_model_len)
    return runner, dims


def step_batch(num_seqs: int, query_len: int, context_len: int, vocab: int) -> StepBatch:
    """num_seqs sequences of random tokens, each at context_len of which its last query_len are new."""
    generator = torch.Generator().manual_seed(0)
    token_ids = torch.randint(100, vocab, (num_seqs * query_len,), generator=generator).tolist()
    sampling = [SeqSampling(GREEDY, seed=i, num_generated=context_len) for i in range(num_seqs)]
    return StepBatch.uniform(query_len, context_len, BLOCK_SIZE, sampling, token_ids=token_ids)


def time_runs(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def breakdown(runner: StageRunner, batch: StepBatch, repeats: int) -> None:
    wall = time_runs(lambda: runner.run(batch), repeats)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            runner.run(batch)
    by_category: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / repeats  # profiler reports microseconds
        by_category[categorise(event.key)] += seconds
        by_op[event.key] += seconds
    print(f"  wall {1e3 * wall:.1f} ms/step without the profiler "
          f"({1e3 * wall / batch.num_tokens:.2f} ms per token); self time by category (profiled):")
    for category, seconds in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"    {category:<42}{1e3 * seconds:8.1f} ms  {seconds / wall:6.1%}")
    ops_total = sum(by_category.values())
    print(f"    {'python and dispatch (wall - op time)':<42}{1e3 * max(0.0, wall - ops_total):8.1f} ms  "
          f"{max(0.0, wall - ops_total) / wall:6.1%}   (op times carry some profiler overhead)")
    num_ops = sum(event.count for event in prof.key_averages()) / repeats
    print(f"  {num_ops:.0f} torch ops per step (nested calls included), {1e6 * wall / num_ops:.1f} us of wall each")
    print("  top ops: " + ", ".join(f"{name} {1e3 * s:.1f} ms" for name, s in
                                    sorted(by_op.items(), key=lambda kv: -kv[1])[:8]))


def driver_costs(batch: StepBatch, repeats: int) -> None:
    """What the driver and the pipes add per step, outside any worker's busy time."""
    from transformers import AutoTokenizer

    from hexcore.engine.detokenizer import IncrementalDetokenizer

    from hexcore.executor.step_messages import Role, StepMessages

    # what the one-stage worker receives for a step of sequences it already knows (its role's message)
    role = Role(is_first=True, is_last=True, is_sampling=True)
    messages = StepMessages([role])
    messages.build(batch)
    message = messages.build(batch)[role]
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    dumps = time_runs(lambda: pickle.dumps(messages.build(batch)[role], protocol=pickle.HIGHEST_PROTOCOL), repeats)
    loads = time_runs(lambda: pickle.loads(payload), repeats)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("default"))
    detokenizers = [IncrementalDetokenizer(tokenizer) for _ in batch.query_lens]
    token_ids = iter(torch.randint(100, 49000, (repeats * 4 * len(detokenizers) + 100,)).tolist())

    def detokenize():
        for d in detokenizers:
            d.append(next(token_ids))
            d.take_new_text(is_final=False)

    detok = time_runs(detokenize, repeats)
    print(f"  step message of {len(batch.query_lens)} known seqs: {len(payload) / 1024:.1f} KiB pickled; build + dumps "
          f"{1e3 * dumps:.2f} ms, loads {1e3 * loads:.2f} ms; incremental detokenize of one token per seq "
          f"{1e3 * detok:.2f} ms")


def fused_against_unfused(runner: StageRunner, batch: StepBatch, repeats: int, rounds: int = 5) -> None:
    """The step's wall time with the fused layer halves (hexcore/kernels/fused_layer.py) and with the
    layers' own ops, in interleaved rounds (before any profiler labels, which would weigh on the
    unfused path's many calls)."""
    from torch import nn

    from hexcore.model.llama import FusedLlamaDecoderLayer

    fused = runner.model.layers
    if not any(isinstance(layer, FusedLlamaDecoderLayer) for layer in fused):
        print("  no fused layers on this device and dtype")
        return
    unfused = nn.ModuleList([getattr(layer, "layer", layer) for layer in fused])
    times: dict[str, list[float]] = {"fused": [], "unfused": []}
    for _ in range(rounds):
        for name, layers in (("fused", fused), ("unfused", unfused)):
            runner.model.layers = layers
            times[name].append(time_runs(lambda: runner.run(batch), repeats))
    runner.model.layers = fused
    with_fused, without = statistics.median(times["fused"]), statistics.median(times["unfused"])
    per_round = ", ".join(f"{u / f:.2f}" for f, u in zip(times["fused"], times["unfused"]))
    print(f"  fused layer halves: {1e3 * with_fused:.1f} ms/step against {1e3 * without:.1f} with the layers' own "
          f"ops, median of {rounds} interleaved rounds ({without / with_fused:.2f}x; per round {per_round})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="*", default=[32, 16], help="decode batch sizes to profile")
    parser.add_argument("--context", type=int, default=192, help="context length of the decode steps")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="tokens in the prefill step (128 per seq)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare-unfused", action="store_true",
                        help="first time each decode step with and without the fused layer halves")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    blocks_per_seq = -(-max(args.context, 128) // BLOCK_SIZE)
    num_seqs = max(max(args.batch), args.prefill_tokens // 128)
    runner, dims = build_runner(num_seqs * blocks_per_seq + 1, max_model_len=max(args.context, 128) + 1)
    print(f"SmolLM2-135M, {dims.num_layers} layers on one rank, {args.threads} threads, block size {BLOCK_SIZE}")
    if args.compare_unfused:
        for batch_size in args.batch:
            print(f"\ndecode step: {batch_size} sequences x 1 token at context {args.context}")
            fused_against_unfused(runner, step_batch(batch_size, 1, args.context, dims.vocab_size), args.repeats)
    _label_compiled_loops(runner)
    for batch_size in args.batch:
        print(f"\ndecode step: {batch_size} sequences x 1 token at context {args.context}")
        batch = step_batch(batch_size, 1, args.context, dims.vocab_size)
        breakdown(runner, batch, args.repeats)
        driver_costs(batch, 20)
    if args.prefill_tokens >= 128:  # --prefill-tokens 0: decode steps only
        print(f"\nprefill step: {args.prefill_tokens // 128} sequences x 128 prompt tokens")
        breakdown(runner, step_batch(args.prefill_tokens // 128, 128, 128, dims.vocab_size),
                  max(1, args.repeats // 2))


if __name__ == "__main__":
    main()
