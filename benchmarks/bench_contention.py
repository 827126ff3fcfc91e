"""What one PP2 stage's linear layers cost alone and while the other stage computes at the same time.

A micro-batched two-stage pipeline runs both stages at once, each on its own core; without overlap
one stage computes while the other waits. Two processes of one thread each hold one stage's linear
layers (15 x SmolLM2's qkv, o, gate_up, down: random float32, 212 MB, so a pass streams them from
memory as a real step does) and time passes over them at 16 and 32 rows: one process alone, then
both together, alternating, so that both see the same phases of a noisy machine.

The overlap this allows: serial, a step is two 32-row passes one after the other; micro-batched, each
stage makes two 16-row passes while the other does the same, so

    ceiling = 32-row pass alone / 16-row pass together

(the linear layers only; the stages' other work and their idle time come on top).

    .venv/bin/python -m benchmarks.bench_contention [--rounds 10] [--seconds 1.5]   # ~1 min
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass

from benchmarks.bench_linear import SHAPES

ROWS = (16, 32)
STAGE_SHAPES = SHAPES[: len(SHAPES) // 2]  # [out, in] per linear layer: the first 15 of SmolLM2's 30 layers


@dataclass(frozen=True)
class Phase:
    rows: int
    seconds: float


def stage_process(conn, seed: int) -> None:
    """Hold one stage's layers; for every Phase received, pass over them for that long and send back
    each pass's seconds. None ends the process."""
    import torch

    from hexcore.kernels.select import linear_kernel

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(seed)
    matmuls = [linear_kernel(torch.randn(shape, generator=generator) * 0.05) for shape in STAGE_SHAPES]
    inputs = {rows: [torch.randn(rows, inp, generator=generator) for _, inp in STAGE_SHAPES] for rows in ROWS}
    conn.send("ready")
    while (phase := conn.recv()) is not None:
        passes, started = [], time.perf_counter()
        while time.perf_counter() - started < phase.seconds:
            begin = time.perf_counter()
            for matmul, x in zip(matmuls, inputs[phase.rows]):
                matmul(x)
            passes.append(time.perf_counter() - begin)
        conn.send(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=1.5, help="length of each timed phase")
    args = parser.parse_args()

    context = mp.get_context("spawn")
    pipes = [context.Pipe() for _ in range(2)]
    processes = [context.Process(target=stage_process, args=(child, seed), daemon=True)
                 for seed, (_, child) in enumerate(pipes)]
    for process in processes:
        process.start()
    conns = [parent for parent, _ in pipes]
    for conn in conns:
        assert conn.recv() == "ready"

    passes: dict[tuple[int, str], list[float]] = {(rows, mode): [] for rows in ROWS for mode in ("alone", "together")}
    for round_index in range(args.rounds):
        for mode in ("alone", "together") if round_index % 2 == 0 else ("together", "alone"):
            for rows in ROWS:
                running = conns[:1] if mode == "alone" else conns
                for conn in running:
                    conn.send(Phase(rows, args.seconds))
                for conn in running:
                    passes[rows, mode] += conn.recv()[1:]  # the first pass of a phase warms the caches
    for conn in conns:
        conn.send(None)
    for process in processes:
        process.join()

    median_ms = {key: 1e3 * statistics.median(times) for key, times in passes.items()}
    print(f"one stage's linear layers (15 of SmolLM2's 30), one thread, median ms per pass over "
          f"{args.rounds} rounds of {args.seconds:g} s:")
    print(f"{'rows':>5} {'alone':>8} {'together':>9} {'slow-down':>10}")
    for rows in ROWS:
        alone, together = median_ms[rows, "alone"], median_ms[rows, "together"]
        print(f"{rows:>5} {alone:>8.1f} {together:>9.1f} {together / alone:>9.2f}x")
    print(f"16-row pass / 32-row pass, alone: {median_ms[16, 'alone'] / median_ms[32, 'alone']:.2f}")
    print(f"PP2 overlap ceiling of the linear layers (32 rows alone / 16 rows together): "
          f"{median_ms[32, 'alone'] / median_ms[16, 'together']:.2f}x")


if __name__ == "__main__":
    main()
