"""The CPU linear kernels side by side: hexcore's packed-panel loop against oneDNN's packed GEMM.

Every linear layer of SmolLM2-135M (30 x [qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536],
then the tied LM head 49152x576), each with its own random float32 weight, so that, as in a real
step, weights come from memory (425 MB of layers, far beyond L3), not from cache. For each batch size
(rows) and thread count: the wall time of one pass over the layers and of the head, the best of
interleaved repetitions, and the panel loop's speed-up; then, per thread count, how long merely
reading that many bytes takes (the memory floor of a 1-row step).

    .venv/bin/python -m benchmarks.bench_linear [--threads 1 2] [--rows 1 16 32 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from hexcore.kernels import panel_linear
from hexcore.kernels.select import PACKED_WEIGHT_BATCH_HINT

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30  # [out, in] per linear layer
HEAD_SHAPE = (49152, 576)


def one_dnn(weight: torch.Tensor):
    """The engine's kernel where the loop cannot be built (hexcore/kernels/select.py `linear_kernel`)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_WEIGHT_BATCH_HINT)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def seconds(matmuls, inputs) -> float:
    start = time.perf_counter()
    for matmul, x in zip(matmuls, inputs):
        matmul(x)
    return time.perf_counter() - start


def memory_floor_seconds(weights: list[torch.Tensor], repeats: int) -> float:
    """How long reading the weights' bytes once takes at this machine's memory bandwidth (best of `repeats`)."""
    flat = torch.ones(sum(w.numel() for w in weights))
    return min(seconds([torch.sum], [flat]) for _ in range(repeats + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 512])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if panel_linear.packed_linear(torch.ones(1, 1)) is None:
        raise SystemExit("the panel loop could not be built here (a C++ compiler and ninja are needed)")
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) * 0.05 for shape in SHAPES + [HEAD_SHAPE]]
    kernels = {"oneDNN": [one_dnn(w) for w in weights], "panels": [panel_linear.packed_linear(w) for w in weights]}
    print(f"{'threads':>7} {'rows':>5} | {'layers ms: oneDNN':>17} {'panels':>7} {'speed-up':>8} {'GFLOP/s':>7} |"
          f" {'head ms: oneDNN':>15} {'panels':>7} {'speed-up':>8}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in args.rows:
            inputs = [torch.randn(rows, w.shape[1], generator=generator) for w in weights]
            best = {}
            for _ in range(args.repeats):  # interleaved, so both kernels see the same phases of a noisy machine
                for name, matmuls in kernels.items():
                    for part, span in (("layers", slice(0, len(SHAPES))), ("head", slice(len(SHAPES), None))):
                        best[name, part] = min(best.get((name, part), float("inf")), seconds(matmuls[span], inputs[span]))
            layer_flops = sum(2 * rows * out * inp for out, inp in SHAPES)
            print(f"{threads:>7} {rows:>5} | {best['oneDNN', 'layers'] * 1e3:>17.1f} {best['panels', 'layers'] * 1e3:>7.1f}"
                  f" {best['oneDNN', 'layers'] / best['panels', 'layers']:>7.2f}x"
                  f" {layer_flops / best['panels', 'layers'] / 1e9:>7.1f} |"
                  f" {best['oneDNN', 'head'] * 1e3:>15.1f} {best['panels', 'head'] * 1e3:>7.1f}"
                  f" {best['oneDNN', 'head'] / best['panels', 'head']:>7.2f}x")
        print(f"{threads:>7} threads: reading as many bytes as layers + head (torch.sum over one buffer) takes"
              f" {memory_floor_seconds(weights, args.repeats) * 1e3:.1f} ms: the floor of a 1-row step's linear layers")


if __name__ == "__main__":
    main()
