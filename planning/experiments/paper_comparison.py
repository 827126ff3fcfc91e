"""Reproduce HexGen's comparison in simulation on Llama-2-70B (writes a PNG plot and a Markdown table).

    .venv/bin/python -m planning.experiments.paper_comparison [--runtime ours paper] [--quick]
    .venv/bin/python -m planning.experiments.paper_comparison --report   # tables and plot from saved points

Pools (configs/clusters): homogeneous 16x A100-40G; heterogeneous 58 GPUs (same budget); heterogeneous
30 GPUs (half budget); the 58-GPU pool restricted to symmetric replicas (same TP and layers in every
stage); and, not planned, the A100 pool as one TP8 replica per node (configs/deployments/
paper-16xa100-hand-2x-tp8.yaml): the layout a homogeneous baseline usually runs, to measure what the
planner's choice of the baseline's layout does to the ratios.
Workload: the paper's trace of prompt {32,64,128} x output {32,64,128} tokens, Poisson arrivals,
SECONDS (120 s) of arrivals per point. Deadlines are `scale x` the single-request latency of one TP8
A100 replica (mean over the trace). Every point is planned anew by `hexgen plan`'s search with its
default settings for its own workload, then simulated on the 120 s trace, under two engines: ours
(continuous batching, micro-batched pipelines) and the paper's runtime (one request at a time per
replica, no micro-batches), which is what the paper's figures measured.
- highest sustained rate: the highest rate at the 8x deadline whose plan keeps >= 90% SLO attainment
  over the 120 s trace (linear interpolation between grid points; the trace is 9 deadlines long),
  capped by that plan's steady-state sustainable rate (planning.simulate.capacity: at most its
  saturated throughput, bisection on 30 s windows): 5% over capacity, a queue takes longer than
  120 s to cost a 13 s deadline. Beside it the steady throughput there (requests finished while
  requests still arrive, per second: no drain).
- lowest deadline: the smallest deadline scale with >= 90% attainment at the runtime's fixed rate.
Points are saved as JSON per runtime (results/paper_comparison_<runtime>.json), so the two runtimes
can run as two processes; the report is written when both are there.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hexcore.config import EngineSpec, load_config, parse_config  # noqa: E402
from planning.simulate.evaluate import evaluate_deployment  # noqa: E402
from planning.inputs.cluster import load_cluster  # noqa: E402
from planning.search.genetic import SearchParams, search  # noqa: E402
from planning.inputs.models import load_model  # noqa: E402
from planning.inputs.workload import WorkloadSpec, load_workload  # noqa: E402
from planning.cost.replica_cost import replica_cost  # noqa: E402
from planning.simulate.capacity import max_sustainable_rate  # noqa: E402
from planning.placement import describe_shapes  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RESULTS = Path(__file__).parent / "results"
HOMOGENEOUS = "homogeneous 16x A100"
FIXED_BASELINE = "16x A100 as 2x TP8 (not planned)"
POOLS = {  # label -> (cluster file, symmetric replicas only, fixed deployment file or None: planned)
    HOMOGENEOUS: ("paper-homogeneous-16xA100.yaml", False, None),
    "heterogeneous 58 GPUs": ("paper-heterogeneous-58gpu.yaml", False, None),
    "heterogeneous half budget": ("paper-heterogeneous-half-budget.yaml", False, None),
    "58 GPUs, symmetric only": ("paper-heterogeneous-58gpu.yaml", True, None),
    FIXED_BASELINE: ("paper-homogeneous-16xA100.yaml", False, "paper-16xa100-hand-2x-tp8.yaml"),
}
TARGET = 0.9
SECONDS = 120.0
DEADLINE_SCALE = 8.0  # of the rate sweep (issue 18's check)
PAPER = {"rate": 4.0, "deadline": 2.3}  # the paper's best same-budget ratios (half budget: about 1x)
DEFAULTS = SearchParams(num_sim_requests=64)  # `hexgen plan`'s defaults


@dataclass(frozen=True)
class Runtime:
    """One engine setting with its sweep grids."""

    key: str
    name: str
    engine: EngineSpec
    rates: tuple[float, ...]
    scales: tuple[float, ...]
    rate: float  # rate of the deadline sweep


RUNTIMES = {
    "ours": Runtime("ours", "our engine (continuous batching, micro-batched pipelines)", EngineSpec(),
                    (32, 48, 56, 64, 80, 96, 104, 112, 120, 128), (1.25, 1.5, 2, 3, 4, 6, 8), 48.0),
    "paper": Runtime("paper", "paper's runtime (one request at a time per replica)",
                     EngineSpec(max_num_seqs=1, num_micro_batches=1),
                     (0.25, 0.5, 1, 1.5, 2, 2.5, 3, 4, 6), (1.25, 1.5, 2, 3, 4, 6, 8), 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--runtime", nargs="+", choices=list(RUNTIMES), default=list(RUNTIMES))
    parser.add_argument("--quick", action="store_true", help="every third grid point, 30 s traces (a smoke run)")
    parser.add_argument("--report", action="store_true", help="only write the report from the saved points")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model("llama-2-70b")
    trace = load_workload(CONFIGS / "workloads" / "paper-llama2-70b.yaml")
    base = deadline_unit(model, trace)
    print(f"deadline unit: single-request latency of one TP8 A100 replica, mean over the trace: {base:.3f} s")
    if not args.report:
        for key in args.runtime:
            runtime = RUNTIMES[key]
            seconds = SECONDS
            if args.quick:
                runtime, seconds = replace(runtime, rates=runtime.rates[::3], scales=runtime.scales[::3]), 30.0
            started = time.perf_counter()
            def save(points, done=False, key=key, runtime=runtime, seconds=seconds, started=started):
                saved = {"runtime": key, "rates": runtime.rates, "scales": runtime.scales, "rate": runtime.rate,
                         "seconds": seconds, "unit_s": base, "elapsed_s": time.perf_counter() - started,
                         "complete": done, "points": points}
                (out / f"paper_comparison_{key}.json").write_text(json.dumps(saved, indent=1))

            save(sweep(runtime, model, trace, base, seconds, partial=save), done=True)
    saved = {key: json.loads(path.read_text()) for key in RUNTIMES if (path := out / f"paper_comparison_{key}.json").exists()}
    if len(saved) == len(RUNTIMES) and (args.report or all(data.get("complete") for data in saved.values())):
        text = report(saved, base)
        (out / "paper_comparison.md").write_text(text)
        print(text)
        plot(saved, base, out / "paper_comparison.png")
        print(f"wrote {out / 'paper_comparison.md'} and {out / 'paper_comparison.png'}")


def sweep(runtime: Runtime, model, trace: WorkloadSpec, base: float, seconds: float, partial=None) -> dict:
    """label -> {"by_rate": [point...], "by_scale": [point...]}"""
    clusters = {label: load_cluster(CONFIGS / "clusters" / name) for label, (name, _, _) in POOLS.items()}
    points = {}
    for label, (_, is_symmetric, fixed) in POOLS.items():
        args = (clusters[label], model, trace, runtime, is_symmetric, fixed, seconds)
        by_rate = []
        for rate in runtime.rates:  # the sustainable rate (a bisection) only for the highest passing rate
            by_rate.append(point(*args, rate, DEADLINE_SCALE * base, top=False))
            if by_rate[-1]["attainment"] < TARGET:
                break
        passing = [p for p in by_rate if p["attainment"] >= TARGET]
        if passing:
            by_rate[len(passing) - 1] = point(*args, passing[-1]["rate"], DEADLINE_SCALE * base, top=True)
        by_rate += [point(*args, rate, DEADLINE_SCALE * base, top=False) for rate in runtime.rates[len(by_rate):]]
        points[label] = {"by_rate": by_rate,
                         "by_scale": [point(*args, runtime.rate, scale * base, top=False) for scale in runtime.scales]}
        if partial is not None:
            partial(points)
        print(f"{runtime.name}, {label}: by rate {[p['attainment'] for p in points[label]['by_rate']]}, "
              f"by deadline {[p['attainment'] for p in points[label]['by_scale']]}", flush=True)
    return points


def point(cluster, model, trace: WorkloadSpec, runtime: Runtime, is_symmetric: bool, fixed: str | None,
          seconds: float, rate: float, slo: float, top: bool) -> dict:
    """The plan for this workload (searched, or the fixed deployment) simulated on `seconds` of arrivals;
    with `top`, also the plan's highest sustainable rate (else nan)."""
    workload = trace.model_copy(update={"rate": rate, "slo_seconds": slo, "num_requests": max(20, int(rate * seconds))})
    started = time.perf_counter()
    if fixed:
        config = load_config(CONFIGS / "deployments" / fixed).model_copy(update={"engine": runtime.engine})
        evaluation = evaluate_deployment(cluster, model, config, workload)
        predicted, sustainable, shape = evaluation.predicted, evaluation.max_sustainable_rate_rps, "2x TP8 (fixed)"
    else:
        try:
            result = search(cluster, model, workload, DEFAULTS, engine=runtime.engine, is_symmetric=is_symmetric,
                            with_sustainable_rate=False)
        except ValueError:
            return {"rate": rate, "slo_s": slo, "attainment": 0.0, "steady_rps": 0.0, "sustainable_rps": 0.0,
                    "plan": "nothing fits", "seconds": 0.0}
        predicted, shape = result.predicted, describe_shapes(result.plan)
        costs = [replica_cost(cluster, model, r, runtime.engine) for r in result.plan.replicas]
        sustainable = max_sustainable_rate(costs, workload, list(result.replica_throughputs_rps)) if top else math.nan
    return {"rate": rate, "slo_s": slo, "attainment": round(predicted.slo_attainment, 4),
            "steady_rps": round(predicted.steady_throughput_rps, 3), "sustainable_rps": round(sustainable, 3),
            "plan": shape, "seconds": round(time.perf_counter() - started, 2)}


def single_request_latency(cluster, model, trace: WorkloadSpec) -> float:
    """Mean E2E latency of requests served alone (one every 100 s) on one TP 8 replica of the pool's
    first node: the fastest replica of the A100 pool."""
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


def sustained_rate(rates: list[float], points: list[dict]) -> float:
    """The highest rate with >= TARGET attainment over the long trace (interpolated), capped by the
    steady-state sustainable rate of the plan planned at the highest passing grid rate: above its
    capacity a plan's queue grows, however slowly, and a finite trace only delays the misses."""
    rate = highest_rate(rates, [p["attainment"] for p in points])
    top = _last_passing(points)
    return min(rate, top["sustainable_rps"]) if top and not math.isnan(top["sustainable_rps"]) else rate


def lowest_scale(scales: list[float], attainments: list[float]) -> float:
    """Smallest deadline scale with attainment >= TARGET from which every larger one holds, interpolated
    from the last miss (inf: never)."""
    for i in range(len(scales)):
        if all(a >= TARGET for a in attainments[i:]):
            if i == 0:
                return scales[0]
            s0, a0, s, a = scales[i - 1], attainments[i - 1], scales[i], attainments[i]
            return s0 + (s - s0) * (TARGET - a0) / (a - a0)
    return math.inf


def _last_passing(points: list[dict]) -> dict | None:
    passing = [p for p in points if p["attainment"] >= TARGET]
    return passing[-1] if passing else None


def report(saved: dict, base: float) -> str:
    first = next(iter(saved.values()))
    lines = [
        f"Llama-2-70B, the paper's trace (prompt {{32,64,128}} x output {{32,64,128}}), Poisson arrivals, "
        f"{first['seconds']:g} s of arrivals per point, target {TARGET:.0%} SLO attainment. Deadline unit = {base:.3f} s "
        f"(single-request latency of one TP8 A100 replica). Every pool but the fixed one planned by `hexgen plan`'s "
        f"search (default settings) for each point's own workload, then simulated on that trace. "
        f"Paper's figures: same budget up to {PAPER['deadline']:g}x lower deadline and up to {PAPER['rate']:g}x "
        f"higher rate than 16x A100; half budget about equal.", "",
    ]
    for key, data in saved.items():
        runtime = RUNTIMES[key]
        rates, scales = data["rates"], data["scales"]
        pts = data["points"]
        att = {label: ([p["attainment"] for p in pts[label]["by_rate"]], [p["attainment"] for p in pts[label]["by_scale"]])
               for label in pts}
        homo_rate = sustained_rate(rates, pts[HOMOGENEOUS]["by_rate"])
        homo_scale = lowest_scale(scales, att[HOMOGENEOUS][1])
        fixed_rate = sustained_rate(rates, pts[FIXED_BASELINE]["by_rate"]) if FIXED_BASELINE in pts else 0.0
        fixed_scale = lowest_scale(scales, att[FIXED_BASELINE][1]) if FIXED_BASELINE in pts else math.inf
        lines += [
            f"### {runtime.name}", "",
            ("" if data.get("complete", True) else f"Incomplete run: pools {', '.join(pts)} only. ") +
            f"Simulated in {data['elapsed_s']:.0f} s. Ratios against the planned A100 pool, and in brackets against "
            f"the A100 pool as 2x TP8 (not planned).", "",
            f"| pool | highest sustained rate at {DEADLINE_SCALE:g}x deadline (req/s) | vs 16x A100 (paper: up to {PAPER['rate']:g}x) | "
            f"steady throughput there (req/s) | plan there | its sustainable rate (req/s) | "
            f"lowest deadline at {data['rate']:g} req/s (x unit) | vs 16x A100 (paper: up to {PAPER['deadline']:g}x lower) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label in pts:
            rate, scale = sustained_rate(rates, pts[label]["by_rate"]), lowest_scale(scales, att[label][1])
            top = _last_passing(pts[label]["by_rate"])
            rate_ratio = (f"{rate / homo_rate:.2f}x" if homo_rate else "n/a") + (f" ({rate / fixed_rate:.2f}x)" if fixed_rate else "")
            if scale == math.inf:
                scale_ratio = "never reached"
            else:
                scale_ratio = (f"{homo_scale / scale:.2f}x" if homo_scale < math.inf else "A100 never reaches it") + (
                    f" ({fixed_scale / scale:.2f}x)" if fixed_scale < math.inf else " (2x TP8 never reaches it)")
            lines.append(
                f"| {label} | {rate:.2f} | {rate_ratio} | {top['steady_rps'] if top else 0:.2f} | {top['plan'] if top else '-'} | "
                f"{top['sustainable_rps'] if top else 0:.2f} | {scale:.2f} | {scale_ratio} |")
        lines += ["", f"SLO attainment by rate (deadline {DEADLINE_SCALE:g}x):", "",
                  "| pool | " + " | ".join(f"{r:g}" for r in rates) + " |", "|---|" + "---|" * len(rates)]
        lines += [f"| {label} | " + " | ".join(f"{a:.2f}" for a in att[label][0]) + " |" for label in pts]
        lines += ["", f"SLO attainment by deadline scale (rate {data['rate']:g} req/s):", "",
                  "| pool | " + " | ".join(f"{s:g}x" for s in scales) + " |", "|---|" + "---|" * len(scales)]
        lines += [f"| {label} | " + " | ".join(f"{a:.2f}" for a in att[label][1]) + " |" for label in pts]
        lines += ["", "Plans by rate:", "", "| pool | " + " | ".join(f"{r:g}" for r in rates) + " |",
                  "|---|" + "---|" * len(rates)]
        lines += [f"| {label} | " + " | ".join(p["plan"] for p in pts[label]["by_rate"]) + " |" for label in pts]
        lines.append("")
    return "\n".join(lines)


def plot(saved: dict, base: float, path: Path) -> None:
    fig, axes = plt.subplots(len(saved), 2, figsize=(11, 4 * len(saved)), squeeze=False)
    for (key, data), (left, right) in zip(saved.items(), axes):
        runtime = RUNTIMES[key]
        for label, pts in data["points"].items():
            style = ":" if label == FIXED_BASELINE else "--" if "symmetric" in label else "-"
            left.plot(data["rates"], [p["attainment"] for p in pts["by_rate"]], style, marker="o", label=label)
            right.plot(data["scales"], [p["attainment"] for p in pts["by_scale"]], style, marker="o", label=label)
        left.set(xscale="log", xlabel="request rate (req/s)", ylabel="SLO attainment",
                 title=f"{runtime.name}\ndeadline {DEADLINE_SCALE:g}x single-request latency, {data['seconds']:g} s traces")
        right.set(xscale="log", xlabel=f"deadline scale (x {base:.2f} s)", ylabel="SLO attainment",
                  title=f"{runtime.name}\nrate {data['rate']:g} req/s, {data['seconds']:g} s traces")
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
