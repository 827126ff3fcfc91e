"""Issue 18's check: `hexgen plan` (default settings) against hand-written plans at high load.

    .venv/bin/python -m planning.experiments.high_load [--rates 96 112 128] [--seconds 120]

Llama-2-70B, the paper's trace (prompt {32,64,128} x output {32,64,128}), Poisson arrivals over
`--seconds` of arrivals, deadline 8x the single-request latency on 16x A100 (paper_comparison's unit).
Per pool and rate: the planner's plan for that very workload (defaults of `hexgen plan`, seed 0) and the
hand plans of configs/deployments, each simulated on the same trace as `hexgen simulate` does, with the
highest sustainable rate of each plan at the deadline (planning.simulate.capacity).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hexcore.config import load_config
from planning.experiments.paper_comparison import CONFIGS, deadline_unit
from planning.inputs.cluster import load_cluster
from planning.inputs.models import load_model
from planning.inputs.workload import load_workload
from planning.placement import describe_shapes, plan_from_config
from planning.search.genetic import SearchParams, search
from planning.simulate.evaluate import evaluate_deployment

DEADLINE_SCALE = 8.0
POOLS = {  # label -> (cluster file, hand plans)
    "heterogeneous 58 GPUs": ("paper-heterogeneous-58gpu.yaml", ["paper-58gpu-hand-one-replica-per-node.yaml"]),
    "homogeneous 16x A100": ("paper-homogeneous-16xA100.yaml",
                             ["paper-16xa100-hand-4x-tp4.yaml", "paper-16xa100-hand-2x-tp8.yaml"]),
}
DEFAULTS = SearchParams(num_sim_requests=64)  # `hexgen plan`'s defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[96, 112, 128])
    parser.add_argument("--seconds", type=float, default=120)
    args = parser.parse_args()
    model = load_model("llama-2-70b")
    trace = load_workload(CONFIGS / "workloads" / "paper-llama2-70b.yaml")
    unit = deadline_unit(model, trace)
    slo = DEADLINE_SCALE * unit
    print(f"deadline {slo:.2f} s ({DEADLINE_SCALE:g}x {unit:.3f} s), {args.seconds:g} s of arrivals per trace")
    print("| pool | rate (req/s) | plan | replicas | SLO attainment | highest sustainable rate (req/s) | search (s) |")
    print("|---|---|---|---|---|---|---|")
    for label, (cluster_file, hand_files) in POOLS.items():
        cluster = load_cluster(CONFIGS / "clusters" / cluster_file)
        for rate in args.rates:
            workload = trace.model_copy(update={"rate": rate, "slo_seconds": slo,
                                                "num_requests": int(rate * args.seconds)})
            started = time.perf_counter()
            result = search(cluster, model, workload, DEFAULTS)
            elapsed = time.perf_counter() - started
            print(f"| {label} | {rate:g} | `hexgen plan` | {describe_shapes(result.plan)} | "
                  f"{result.predicted.slo_attainment:.3f} | {result.max_sustainable_rate_rps:.1f} | {elapsed:.1f} |", flush=True)
            for hand in hand_files:
                config = load_config(CONFIGS / "deployments" / hand)
                evaluation = evaluate_deployment(cluster, model, config, workload)
                shape = describe_shapes(plan_from_config(config, cluster))
                print(f"| {label} | {rate:g} | {Path(hand).stem} | {shape} | {evaluation.predicted.slo_attainment:.3f} | "
                      f"{evaluation.max_sustainable_rate_rps:.1f} | |", flush=True)


if __name__ == "__main__":
    main()
