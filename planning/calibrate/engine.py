"""The engine's own stage on this machine, and the cost model's overheads fitted to it.

One worker's hexcore StageRunner (its layers over the paged KV cache, the LM head and sampling) runs
synthetic steps in this process, at two layer counts and several shapes, and the cost model's free
figures are fitted to them: the effective compute and three overheads in

    step time = [the roofline: per layer and for the head, max(flops / compute, bytes / bandwidth)]
                + layers * (overhead_per_layer + overhead_per_kv_token * kv_read_tokens) + overhead_per_step

with the bandwidth as measured (planning/cost/stage_cost.py adds them up the same way). The effective
compute is what the engine's own GEMMs reach (a few hundred rows of 576 columns run below a large
square matmul's rate).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from planning.calibrate.device import torch_threads
from planning.cost.stage_cost import StageCost
from planning.inputs.catalog import DeviceSpec, LinkSpec
from planning.inputs.models import ModelSpec

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

    from hexcore.executor.messages import SeqSampling, StepBatch
    from hexcore.sampling_params import SamplingParams
    from hexcore.worker.stage_runner import single_rank_runner

    longest = max(s.num_seqs * -(-s.context_len // BLOCK_SIZE) for s in shapes)
    greedy = SeqSampling(SamplingParams(temperature=0.0, max_tokens=1), seed=0, num_generated=0)
    with torch_threads(num_threads), torch.inference_mode():
        # the model's first `num_layers` layers as a whole model: embedding, layers, LM head
        runners = {num_layers: single_rank_runner(model_dir, num_layers, dtype, longest, BLOCK_SIZE,
                                                  max(s.context_len for s in shapes))
                   for num_layers in layer_counts}
        batches = [StepBatch.uniform(s.num_new_tokens, s.context_len, BLOCK_SIZE, [greedy] * s.num_seqs)
                   for s in shapes]
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


@dataclass(frozen=True)
class OverheadFit:
    tflops: float  # effective compute of the engine's stage
    ms_per_layer: float
    us_per_kv_token: float
    ms_per_step: float


# The effective compute is searched over this range (TFLOPS), on a log grid and then by golden section
# (60 steps shrink the bracket by 0.618^60 ~ 3e-13, below double precision's relative step).
COMPUTE_RANGE_TFLOPS = (1e-4, 1e3)
NUM_GRID_POINTS = 200
GOLDEN_SECTION_STEPS = 60
_BARE = {"overhead_ms_per_layer": 0.0, "overhead_ms_per_step": 0.0, "overhead_us_per_kv_token": 0.0,
         "gemm_weight_passes": 1.0}
_NO_LINK = LinkSpec(bandwidth_gbps=1, latency_ms=0)


def fit_overheads(timings: list[StageTiming], model: ModelSpec, device: DeviceSpec) -> OverheadFit:
    """The effective compute and the three overheads that best explain the timings, each timing's
    error relative to it (short and long steps count alike). For a given compute rate the overheads
    enter linearly: exact non-negative least squares (the best unconstrained fit over every subset of
    the three terms whose coefficients are all non-negative). The rate itself is searched: the error
    on a log grid, then a golden-section refinement around the grid's best point. Regressors are read
    off the cost model itself, so the fit and the model cannot disagree on what a term means."""
    measured = np.array([t.median_s for t in timings])
    overhead_rows = np.array([[t.num_layers, t.num_layers * t.shape.num_seqs * t.shape.context_len, 1.0]
                              for t in timings]) / measured[:, None]

    def fit_at(log_tflops: float) -> tuple[float, np.ndarray]:
        stage = StageCost(model, device.model_copy(update={**_BARE, "tflops": math.exp(log_tflops)}), 1, _NO_LINK,
                          True, True)
        rest = (measured - np.array([t.shape.step_time(stage, t.num_layers) for t in timings])) / measured
        return _nonnegative_least_squares(overhead_rows, rest)

    low, high = (math.log(x) for x in COMPUTE_RANGE_TFLOPS)
    grid = np.linspace(low, high, NUM_GRID_POINTS)
    best = int(np.argmin([fit_at(x)[0] for x in grid]))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    error_c, error_d = fit_at(c)[0], fit_at(d)[0]
    for _ in range(GOLDEN_SECTION_STEPS):  # one new point per step: the other inner point carries over
        if error_c <= error_d:
            b, d, error_d = d, c, error_c
            c = b - ratio * (b - a)
            error_c = fit_at(c)[0]
        else:
            a, c, error_c = c, d, error_d
            d = a + ratio * (b - a)
            error_d = fit_at(d)[0]
    log_tflops = (a + b) / 2
    per_layer, per_kv_token, per_step = fit_at(log_tflops)[1]
    return OverheadFit(tflops=math.exp(log_tflops), ms_per_layer=float(per_layer * 1e3),
                       us_per_kv_token=float(per_kv_token * 1e6), ms_per_step=float(per_step * 1e3))


def faster_than_memory(timings: list[StageTiming], model: ModelSpec, device: DeviceSpec) -> list[StageTiming]:
    """The steps that ran faster than their weights and KV can stream at the device's bandwidth: none
    on a sound measurement; some when the bandwidth was measured low (a busy machine), which the fit
    then absorbs into a wrong compute rate."""
    memory_only = StageCost(model, device.model_copy(update={**_BARE, "tflops": 1e12}), 1, _NO_LINK, True, True)
    return [t for t in timings if t.median_s < t.shape.step_time(memory_only, t.num_layers)]


def _nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """(squared error, x >= 0) minimising |a x - b|^2: with so few columns, the best of the
    unconstrained fits over every subset of them whose coefficients are all non-negative."""
    num_terms = a.shape[1]
    best_error, best = float(np.sum(b ** 2)), np.zeros(num_terms)  # the empty subset
    for size in range(1, num_terms + 1):
        for columns in itertools.combinations(range(num_terms), size):
            x, *_ = np.linalg.lstsq(a[:, columns], b, rcond=None)
            if np.all(x >= 0):
                coefficients = np.zeros(num_terms)
                coefficients[list(columns)] = x
                error = float(np.sum((a @ coefficients - b) ** 2))
                if error < best_error:
                    best_error, best = error, coefficients
    return best_error, best
