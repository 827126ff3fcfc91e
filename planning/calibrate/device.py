"""Micro-benchmarks of one worker as the cost model sees a device: matmul throughput, weight-scan
bandwidth, and the wall time of one decoder layer (to fit the fixed per-layer overhead).

Every figure is the fastest of repeated timings at a given torch thread count: other processes on
a shared machine only ever slow a repetition down, so the fastest is the least disturbed and the
most repeatable from run to run. `spread` = (slowest - fastest) / fastest shows how noisy it was.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from planning.inputs.models import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



@dataclass(frozen=True)
class Timing:
    best_s: float
    spread: float

    @classmethod
    def of(cls, fn: Callable[[], object], num_reps: int) -> "Timing":
        fn()  # warm-up: first-call allocations and kernel selection
        seconds = []
        for _ in range(num_reps):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        best = min(seconds)
        return cls(best, (max(seconds) - best) / best)


@dataclass(frozen=True)
class ComputeMeasurement:
    """One worker at `num_threads` threads."""

    num_threads: int
    tflops: float  # dense matmul, 2*n^3 flops per n x n product
    tflops_spread: float
    mem_bandwidth_gbs: float  # matrix-vector product: weight bytes read per second
    mem_bandwidth_spread: float


@contextmanager
def torch_threads(num_threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_compute(dtype: str, num_threads: int, matmul_size: int, scan_bytes: int, num_reps: int) -> ComputeMeasurement:
    """Matmul throughput on n x n operands, and the bandwidth of scanning a `scan_bytes` weight matrix
    with one vector (the decode pattern: every weight read once per step)."""
    torch_dtype = DTYPES[dtype]
    a = torch.empty(matmul_size, matmul_size, dtype=torch_dtype).uniform_(-1, 1)
    b = torch.empty(matmul_size, matmul_size, dtype=torch_dtype).uniform_(-1, 1)
    num_cols = 4096
    num_rows = max(1, scan_bytes // (num_cols * a.element_size()))
    weight = torch.empty(num_rows, num_cols, dtype=torch_dtype).uniform_(-1, 1)
    vector = torch.empty(1, num_cols, dtype=torch_dtype).uniform_(-1, 1)
    with torch_threads(num_threads), torch.inference_mode():
        matmul = Timing.of(lambda: torch.mm(a, b), num_reps)
        scan = Timing.of(lambda: F.linear(vector, weight), num_reps)
    return ComputeMeasurement(
        num_threads=num_threads,
        tflops=2 * matmul_size**3 / matmul.best_s / 1e12,
        tflops_spread=matmul.spread,
        mem_bandwidth_gbs=weight.numel() * weight.element_size() / scan.best_s / 1e9,
        mem_bandwidth_spread=scan.spread,
    )


class LayerBench:
    """Wall time of one Llama-style decoder layer (RMSNorm, QKV, grouped-query attention, O, RMSNorm,
    gated MLP) in plain torch. Calls rotate over enough copies of the layer's weights to fill
    `flush_bytes` (more than the CPU caches hold, as a whole model's weights do)."""

    def __init__(self, model: ModelSpec, dtype: str, flush_bytes: int):
        self.model = model
        self.dtype = DTYPES[dtype]
        layer_bytes = model.params_per_layer * self.dtype.itemsize
        num_copies = min(model.num_layers, max(1, -(-flush_bytes // layer_bytes)))
        h, kv, i = model.hidden_size, model.kv_dim, model.intermediate_size
        shapes = ((h + 2 * kv, h), (h, h), (2 * i, h), (h, i))  # QKV, O, gate+up, down as [out, in]
        self.layers = [
            tuple(torch.empty(shape, dtype=self.dtype).uniform_(-0.05, 0.05) for shape in shapes)
            for _ in range(num_copies)
        ]
        self.norm = torch.ones(h, dtype=self.dtype)

    def time(self, num_threads: int, num_seqs: int, num_new_tokens: int, context_len: int, num_reps: int) -> Timing:
        """`num_seqs` sequences each adding `num_new_tokens` tokens after `context_len` cached ones
        (decode: 1 new token; prefill: the whole prompt, no cache)."""
        m, dt = self.model, self.dtype
        h, kv, heads, kv_heads, head_dim = m.hidden_size, m.kv_dim, m.num_heads, m.num_kv_heads, m.head_dim
        total_len = context_len + num_new_tokens
        k_cache = torch.randn(num_seqs, kv_heads, total_len, head_dim).to(dt)  # new keys go to the tail
        v_cache = torch.randn(num_seqs, kv_heads, total_len, head_dim).to(dt)
        x = torch.randn(num_seqs, num_new_tokens, h).to(dt)
        weights = itertools.cycle(self.layers)

        def heads_first(t: torch.Tensor, num: int) -> torch.Tensor:
            return t.reshape(num_seqs, num_new_tokens, num, head_dim).transpose(1, 2)

        def layer() -> torch.Tensor:
            w_qkv, w_o, w_gate_up, w_down = next(weights)
            q, k, v = F.linear(F.rms_norm(x, (h,), self.norm), w_qkv).split([h, kv, kv], dim=-1)
            k_cache[:, :, context_len:] = heads_first(k, kv_heads)
            v_cache[:, :, context_len:] = heads_first(v, kv_heads)
            attn = F.scaled_dot_product_attention(
                heads_first(q, heads), k_cache, v_cache, is_causal=context_len == 0, enable_gqa=True
            )
            hidden = x + F.linear(attn.transpose(1, 2).reshape(num_seqs, num_new_tokens, h), w_o)
            gate, up = F.linear(F.rms_norm(hidden, (h,), self.norm), w_gate_up).chunk(2, dim=-1)
            return hidden + F.linear(F.silu(gate) * up, w_down)

        with torch_threads(num_threads), torch.inference_mode():
            return Timing.of(layer, num_reps)
