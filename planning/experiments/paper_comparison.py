"""Reproduce HexGen's comparison in simulation on Llama-2-70B (writes a PNG plot and a Markdown table).

    .venv/bin/python -m planning.experiments.paper_comparison [--quick] [--out planning/experiments/results]

Pools (configs/clusters): homogeneous 16x A100-40G; heterogeneous 58 GPUs (same budget); heterogeneous
30 GPUs (half budget); and the 58-GPU pool restricted to symmetric replicas (same TP and layers in every
stage). Workload: the paper's trace of prompt {32,64,128} x output {32,64,128} tokens, Poisson arrivals.
Deadlines are `scale x` the single-request latency of the homogeneous pool (mean over the trace).
Every point is planned anew by the DP + genetic search for its own workload, then simulated, under two
engines: ours (continuous batching, micro-batched pipelines) and the paper's runtime (one request at a
time per replica, no micro-batches), which is what the paper's figures measured.
Ratios: rate = highest request rate with >= 90% SLO attainment (at the fixed deadline scale);
deadline = smallest deadline scale with >= 90% attainment (at the fixed rate); linear interpolation
between grid points.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hexcore.config import EngineSpec, parse_config  # noqa: E402
from planning.simulate.evaluate import evaluate_deployment  # noqa: E402
from planning.inputs.cluster import load_cluster  # noqa: E402
from planning.search.genetic import SearchParams, search  # noqa: E402
from planning.inputs.models import load_model  # noqa: E402
from planning.inputs.workload import WorkloadSpec, load_workload  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
POOLS = {  # label -> (cluster file, symmetric replicas only)
    "homogeneous 16x A100": ("paper-homogeneous-16xA100.yaml", False),
    "heterogeneous 58 GPUs": ("paper-heterogeneous-58gpu.yaml", False),
    "heterogeneous half budget": ("paper-heterogeneous-half-budget.yaml", False),
    "58 GPUs, symmetric only": ("paper-heterogeneous-58gpu.yaml", True),
}
HOMOGENEOUS = "homogeneous 16x A100"
TARGET = 0.9
PARAMS = SearchParams(population=16, generations=12, patience=4, seed=0, num_sim_requests=48)


@dataclass(frozen=True)
class Runtime:
    """One engine setting with its sweep grids."""

    name: str
    engine: EngineSpec
    rates: tuple[float, ...]
    deadline_scale: float  # deadline of the rate sweep
    scales: tuple[float, ...]
    rate: float  # rate of the deadline sweep


RUNTIMES = (
    Runtime("our engine (continuous batching, micro-batched pipelines)", EngineSpec(),
            (4, 8, 16, 32, 48, 64, 96, 128), 8.0, (1.25, 1.5, 2, 3, 4, 6, 8, 12), 48.0),
    Runtime("paper's runtime (one request at a time per replica)", EngineSpec(max_num_seqs=1, num_micro_batches=1),
            (0.125, 0.25, 0.5, 1, 2, 4, 6, 8, 10), 4.0, (1.25, 1.5, 2, 3, 4, 6, 8, 12), 1.0),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quick", action="store_true", help="every third grid point (a smoke run)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model("llama-2-70b")
    trace = load_workload(CONFIGS / "workloads" / "paper-llama2-70b.yaml")
    clusters = {label: load_cluster(CONFIGS / "clusters" / name) for label, (name, _) in POOLS.items()}
    base = single_request_latency(clusters[HOMOGENEOUS], model, trace)
    print(f"deadline unit: single-request latency on 16x A100, mean over the trace: {base:.3f} s")
    started = time.perf_counter()
    tables, results = [], []
    for runtime in RUNTIMES:
        if args.quick:
            runtime = replace(runtime, rates=runtime.rates[::3], scales=runtime.scales[::3])
        by_rate, by_scale = {}, {}
        for label, (_, is_symmetric) in POOLS.items():
            by_rate[label] = [attainment(clusters[label], model, trace, runtime, is_symmetric, r, runtime.deadline_scale * base)
                              for r in runtime.rates]
            by_scale[label] = [attainment(clusters[label], model, trace, runtime, is_symmetric, runtime.rate, s * base)
                               for s in runtime.scales]
            print(f"{runtime.name}, {label}: by rate {by_rate[label]}, by deadline {by_scale[label]}", flush=True)
        results.append((runtime, by_rate, by_scale))
        tables.append(summary_table(runtime, by_rate, by_scale))
    elapsed = time.perf_counter() - started
    text = (
        f"Llama-2-70B, the paper's trace (prompt {{32,64,128}} x output {{32,64,128}}), Poisson arrivals, "
        f"target {TARGET:.0%} SLO attainment. Deadline unit = {base:.2f} s (single-request latency on "
        f"16x A100). Every point planned by DP + genetic search, then simulated ({elapsed:.0f} s in all).\n\n"
        + "\n".join(tables)
    )
    (out / "paper_comparison.md").write_text(text)
    print(text)
    plot(results, base, out / "paper_comparison.png")
    print(f"wrote {out / 'paper_comparison.md'} and {out / 'paper_comparison.png'}")


def attainment(cluster, model, trace: WorkloadSpec, runtime: Runtime, is_symmetric: bool, rate: float, slo: float) -> float:
    """SLO attainment of the plan searched for this very workload (0 when nothing fits). The search
    simulates 100-300 requests per candidate; the chosen plan, at least 30 s of arrivals."""
    workload = trace.model_copy(update={"rate": rate, "slo_seconds": slo, "num_requests": max(300, int(30 * rate))})
    params = replace(PARAMS, num_sim_requests=min(300, max(100, int(20 * rate))))
    try:
        return search(cluster, model, workload, params, engine=runtime.engine, is_symmetric=is_symmetric).predicted.slo_attainment
    except ValueError:
        return 0.0


def single_request_latency(cluster, model, trace: WorkloadSpec) -> float:
    """Mean E2E latency of requests served alone (one every 100 s) on one TP 8 replica of the pool's
    first node: the fastest replica of the A100 pool (the planner, which prefers headroom, may not
    return it at low load)."""
    alone = trace.model_copy(update={"rate": 0.01, "slo_seconds": 1e6, "num_requests": len(trace.length_pairs)})
    devices = [f"{cluster.nodes[0].name}/cuda:{i}" for i in range(8)]
    config = parse_config({"dtype": model.dtype, "replicas": [{"stages": [{"devices": devices, "layers": model.num_layers}]}]})
    return evaluate_deployment(cluster, model, config, alone).predicted.mean_latency_s


def deadline_unit(model, trace: WorkloadSpec) -> float:
    """The deadline unit: single-request latency on 16x A100 (one TP 8 replica), mean over the trace."""
    return single_request_latency(load_cluster(CONFIGS / "clusters" / POOLS[HOMOGENEOUS][0]), model, trace)


def highest_rate(rates: list[float], attainments: list[float]) -> float:
    """Highest rate with attainment >= TARGET, interpolated to the first crossing below it."""
    best = 0.0
    for (r0, a0), (r1, a1) in zip(zip(rates, attainments), zip(rates[1:], attainments[1:])):
        if a0 < TARGET:
            break
        best = r1 if a1 >= TARGET else r0 + (r1 - r0) * (a0 - TARGET) / (a0 - a1)
        if a1 < TARGET:
            break
    return best if attainments[0] >= TARGET else 0.0


def lowest_scale(scales: list[float], attainments: list[float]) -> float:
    """Smallest deadline scale with attainment >= TARGET, interpolated from the last miss (inf: never)."""
    for i, (s, a) in enumerate(zip(scales, attainments)):
        if a >= TARGET:
            if i == 0:
                return s
            s0, a0 = scales[i - 1], attainments[i - 1]
            return s0 + (s - s0) * (TARGET - a0) / (a - a0)
    return float("inf")


def summary_table(runtime: Runtime, by_rate: dict, by_scale: dict) -> str:
    homo_rate = highest_rate(runtime.rates, by_rate[HOMOGENEOUS])
    homo_scale = lowest_scale(runtime.scales, by_scale[HOMOGENEOUS])
    lines = [
        f"### {runtime.name}", "",
        f"| pool | highest rate at {runtime.deadline_scale:g}x deadline (req/s) | vs homogeneous | "
        f"lowest deadline at {runtime.rate:g} req/s (x unit) | vs homogeneous |",
        "|---|---|---|---|---|",
    ]
    for label in POOLS:
        rate, scale = highest_rate(runtime.rates, by_rate[label]), lowest_scale(runtime.scales, by_scale[label])
        rate_ratio = f"{rate / homo_rate:.2f}x" if homo_rate else "n/a"
        if scale == float("inf"):
            scale_ratio = "never reached"
        elif homo_scale == float("inf"):
            scale_ratio = "homogeneous never reaches it"
        else:
            scale_ratio = f"{homo_scale / scale:.2f}x lower"
        lines.append(f"| {label} | {rate:.2f} | {rate_ratio} | {scale:.2f} | {scale_ratio} |")
    lines += ["", f"SLO attainment by rate (deadline {runtime.deadline_scale:g}x):", "",
              "| pool | " + " | ".join(f"{r:g}" for r in runtime.rates) + " |", "|---|" + "---|" * len(runtime.rates)]
    lines += [f"| {label} | " + " | ".join(f"{a:.2f}" for a in by_rate[label]) + " |" for label in POOLS]
    lines += ["", f"SLO attainment by deadline scale (rate {runtime.rate:g} req/s):", "",
              "| pool | " + " | ".join(f"{s:g}x" for s in runtime.scales) + " |", "|---|" + "---|" * len(runtime.scales)]
    lines += [f"| {label} | " + " | ".join(f"{a:.2f}" for a in by_scale[label]) + " |" for label in POOLS]
    return "\n".join(lines) + "\n"


def plot(results, base: float, path: Path) -> None:
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for (runtime, by_rate, by_scale), (left, right) in zip(results, axes):
        for label in POOLS:
            style = "--" if "symmetric" in label else "-"
            left.plot(runtime.rates, by_rate[label], style, marker="o", label=label)
            right.plot(runtime.scales, by_scale[label], style, marker="o", label=label)
        left.set(xscale="log", xlabel="request rate (req/s)", ylabel="SLO attainment",
                 title=f"{runtime.name}\ndeadline {runtime.deadline_scale:g}x single-request latency")
        right.set(xscale="log", xlabel=f"deadline scale (x {base:.2f} s)", ylabel="SLO attainment",
                  title=f"{runtime.name}\nrate {runtime.rate:g} req/s")
        for axis in (left, right):
            axis.axhline(TARGET, color="grey", linewidth=0.8, linestyle=":")
            axis.set_ylim(-0.02, 1.02)
            axis.grid(alpha=0.3)
            axis.title.set_fontsize(9)
            axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        left.legend(fontsize=8)
    fig.suptitle("Llama-2-70B, simulated: homogeneous vs heterogeneous pools (HexGen's comparison)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
