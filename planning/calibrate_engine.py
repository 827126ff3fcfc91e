"""The engine's own stage on this machine, and the cost model's overheads fitted to it.

One worker's hexcore StageRunner (its layers over the paged KV cache, the LM head and sampling) runs
synthetic steps in this process, at two layer counts and several shapes. The cost model's memory
time (weights and KV at the measured bandwidth) explains part of each step time; the rest is fitted,
by non-negative least squares on relative errors, as

    rest = flops / effective_compute + (gemm_weight_passes - 1) * weight_time [steps of 2+ tokens]
           + layers * (overhead_per_layer + overhead_per_kv_token * kv_read_tokens) + overhead_per_step

which is how planning/cost_model.py adds them up on a cpu. The effective compute is what the engine's
own GEMMs reach (a few hundred rows of 576 columns run well below a large square matmul's rate).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from planning.calibrate_device import DTYPES, torch_threads
from planning.cost_model import StageCost
from planning.devices import DeviceSpec, LinkSpec
from planning.models import ModelSpec

LAYER_COUNTS = (30, 10)
BLOCK_SIZE = 16


@dataclass(frozen=True)
class StepShape:
    num_seqs: int
    num_new_tokens: int  # per sequence
    context_len: int  # per sequence, after the step

    @property
    def label(self) -> str:
        if self.num_new_tokens == 1:
            return f"decode, batch {self.num_seqs}, context {self.context_len}"
        return f"prefill, {self.num_seqs} x {self.num_new_tokens} tokens"

    def step_time(self, stage: StageCost, num_layers: int) -> float:
        """The cost model's time of this step (pairs: q new tokens after c - q cached attend
        q * (c - q) + q (q + 1) / 2 keys)."""
        n, q, c = self.num_seqs, self.num_new_tokens, self.context_len
        return stage.step_time(num_layers, n * q, n * (q * (c - q) + q * (q + 1) / 2), n * c, n)


SHAPES = (StepShape(1, 1, 128), StepShape(2, 1, 96), StepShape(4, 1, 128), StepShape(8, 1, 96),
          StepShape(16, 1, 128), StepShape(1, 64, 64), StepShape(1, 128, 128))
QUICK_SHAPES = (StepShape(1, 1, 64), StepShape(4, 1, 64), StepShape(1, 32, 32))


@dataclass(frozen=True)
class StageTiming:
    shape: StepShape
    num_layers: int
    median_s: float  # the median repetition: the engine runs every step under whatever else runs
    spread: float  # (slowest - fastest) / fastest


def time_engine_stage(model_dir, dtype: str, num_threads: int, shapes, num_reps: int,
                      layer_counts=LAYER_COUNTS) -> list[StageTiming]:
    """Time every shape on a one-stage replica of each layer count (one worker, TP 1, this process)."""
    import torch
    from transformers import AutoConfig

    from hexcore.kv_cache import allocate_kv_cache
    from hexcore.llama import LlamaDims, RopeSpec, load_stage
    from hexcore.messages import SeqSampling, StageLayout
    from hexcore.parallel import SINGLE
    from hexcore.sampling_params import SamplingParams
    from hexcore.stage_runner import StageRunner
    from hexcore.weights import Checkpoint

    config = AutoConfig.from_pretrained(model_dir)
    dims, rope = LlamaDims.from_hf(config), RopeSpec.from_hf(config)
    device = torch.device("cpu")
    longest = max(s.num_seqs * -(-s.context_len // BLOCK_SIZE) for s in shapes)
    greedy = SeqSampling(SamplingParams(temperature=0.0, max_tokens=1), seed=0, num_generated=0)
    with torch_threads(num_threads), torch.inference_mode():
        runners = {}
        for num_layers in layer_counts:
            checkpoint = Checkpoint(model_dir, DTYPES[dtype], device)
            # the model's first `num_layers` layers as a whole model: embedding, layers, LM head
            truncated = dataclasses.replace(dims, num_layers=num_layers)
            stage = load_stage(checkpoint, truncated, rope, 0, num_layers, SINGLE, max(s.context_len for s in shapes))
            checkpoint.close()
            kv = allocate_kv_cache(num_layers, longest, BLOCK_SIZE, dims.num_kv_heads, dims.head_dim,
                                   DTYPES[dtype], device)
            runners[num_layers] = StageRunner(stage, kv, SINGLE, 0, 0, (StageLayout(0, num_layers, (0,)),),
                                              BLOCK_SIZE, device)
        batches = [_batch(shape, greedy) for shape in shapes]
        seconds: dict[tuple[int, int], list[float]] = {}
        for rep in range(num_reps + 1):  # the first is a warm-up; interleaved, so load changes hit all alike
            for i, batch in enumerate(batches):
                for num_layers, runner in runners.items():
                    started = time.perf_counter()
                    runner.run(batch)
                    if rep:
                        seconds.setdefault((i, num_layers), []).append(time.perf_counter() - started)
    return [StageTiming(shape, num_layers, float(np.median(reps)), (max(reps) - min(reps)) / min(reps))
            for num_layers in layer_counts for i, shape in enumerate(shapes)
            for reps in [seconds[(i, num_layers)]]]


def _batch(shape: StepShape, sampling):
    from hexcore.messages import StepBatch

    n, q, c = shape.num_seqs, shape.num_new_tokens, shape.context_len
    blocks = -(-c // BLOCK_SIZE)
    return StepBatch(step_id=0, token_ids=[1] * (n * q), positions=[p for _ in range(n) for p in range(c - q, c)],
                     query_lens=[q] * n, context_lens=[c] * n,
                     block_tables=[list(range(i * blocks, (i + 1) * blocks)) for i in range(n)],
                     sampling=[sampling] * n, prompt_scoring=[None] * n)


@dataclass(frozen=True)
class OverheadFit:
    tflops: float  # effective compute of the engine's stage
    gemm_weight_passes: float
    ms_per_layer: float
    us_per_kv_token: float
    ms_per_step: float


def fit_overheads(timings: list[StageTiming], model: ModelSpec, device: DeviceSpec) -> OverheadFit:
    """Non-negative least squares of (measured - one weight pass and the KV reads at the measured
    bandwidth) over the five terms, each row scaled by 1 / measured so short and long steps count alike.
    The exact NNLS with so few unknowns: the best of the unconstrained fits, over every subset of terms
    that includes compute, whose coefficients are all non-negative. A term's regressor is read off the
    cost model itself (e.g. flops: its time at 1 TFLOPS with infinite bandwidth and no overheads)."""
    bare = {"overhead_ms_per_layer": 0.0, "overhead_ms_per_step": 0.0, "overhead_us_per_kv_token": 0.0,
            "gemm_weight_passes": 1.0}
    link = LinkSpec(bandwidth_gbps=1, latency_ms=0)

    def cost(**update) -> StageCost:
        return StageCost(model, device.model_copy(update={**bare, **update}), 1, link, True, True)

    memory_only, two_passes = cost(tflops=1e12), cost(tflops=1e12, gemm_weight_passes=2.0)
    compute_only = cost(tflops=1.0, mem_bandwidth_gbs=1e12)
    rows, rest = [], []
    for t in timings:
        s, layers = t.shape, t.num_layers
        memory = s.step_time(memory_only, layers)
        rows.append([s.step_time(compute_only, layers), s.step_time(two_passes, layers) - memory,
                     layers, layers * s.num_seqs * s.context_len, 1.0])
        rest.append(t.median_s - memory)
    weights = 1.0 / np.array([t.median_s for t in timings])
    a, b = np.array(rows) * weights[:, None], np.array(rest) * weights
    num_terms = a.shape[1]
    best, best_error = None, math.inf
    for size in range(1, num_terms + 1):
        for columns in itertools.combinations(range(num_terms), size):
            if 0 not in columns:  # compute time is never free
                continue
            x, *_ = np.linalg.lstsq(a[:, columns], b, rcond=None)
            if np.all(x >= 0) and x[0] > 0:
                coefficients = np.zeros(num_terms)
                coefficients[list(columns)] = x
                error = float(np.sum((a @ coefficients - b) ** 2))
                if error < best_error:
                    best, best_error = coefficients, error
    if best is None:
        raise ValueError("the engine's stage timings fit no non-negative cost model (steps faster than memory allows?)")
    return OverheadFit(tflops=float(1.0 / best[0]), gemm_weight_passes=float(1.0 + best[1]),
                       ms_per_layer=float(best[2] * 1e3), us_per_kv_token=float(best[3] * 1e6),
                       ms_per_step=float(best[4] * 1e3))
