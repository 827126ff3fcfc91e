"""How the deadline ratio depends on the rate it is measured at (paper comparison, modelling choice).

    .venv/bin/python -m planning.experiments.deadline_at_load   # ~2-4 min

The plans the planner returns on the paper pools (as deployment files: 16x A100 as 4x TP4 and as
2x TP8, the 58 GPUs as one replica per node, TP4 on the A6000 halves and the A40), simulated on 120 s
traces at a light and at a heavy rate per engine, over deadline scales: the lowest scale with >= 90%
attainment, per pool. No search (the plans are fixed), so the rate alone changes.
"""

from __future__ import annotations

from hexcore.config import load_config
from planning.experiments.paper_comparison import CONFIGS, RUNTIMES, SECONDS, TARGET, deadline_unit, lowest_scale
from planning.inputs.cluster import load_cluster
from planning.inputs.models import load_model
from planning.inputs.workload import load_workload
from planning.placement import plan_from_config
from planning.simulate.capacity import saturated_throughput_rps
from planning.simulate.evaluate import replica_costs
from planning.simulate.simulator import simulate

PLANS = {  # label -> (cluster file, deployment file)
    "16x A100 as 4x TP4": ("paper-homogeneous-16xA100.yaml", "paper-16xa100-hand-4x-tp4.yaml"),
    "16x A100 as 2x TP8": ("paper-homogeneous-16xA100.yaml", "paper-16xa100-hand-2x-tp8.yaml"),
    "58 GPUs, one replica per node (TP4 halves)": ("paper-heterogeneous-58gpu.yaml", "paper-58gpu-hand-one-replica-per-node.yaml"),
}
RATES = {"ours": (48.0, 96.0), "paper": (1.0, 1.5)}
SCALES = (1.25, 1.5, 2, 3, 4, 6, 8, 12)


def main() -> None:
    model = load_model("llama-2-70b")
    trace = load_workload(CONFIGS / "workloads" / "paper-llama2-70b.yaml")
    base = deadline_unit(model, trace)
    print(f"deadline unit {base:.3f} s; {SECONDS:g} s of arrivals; lowest deadline scale with >= {TARGET:.0%} attainment")
    print("| engine | rate (req/s) | " + " | ".join(PLANS) + " |")
    print("|---|---|" + "---|" * len(PLANS))
    for key, rates in RATES.items():
        runtime = RUNTIMES[key]
        for rate in rates:
            cells = []
            for cluster_file, deployment in PLANS.values():
                cluster = load_cluster(CONFIGS / "clusters" / cluster_file)
                config = load_config(CONFIGS / "deployments" / deployment).model_copy(update={"engine": runtime.engine})
                workload = trace.model_copy(update={"rate": rate, "num_requests": int(rate * SECONDS)})
                costs = replica_costs(cluster, model, config, plan_from_config(config, cluster))
                capacities = [saturated_throughput_rps(c, workload) for c in costs]
                attainments = [simulate(costs, workload.model_copy(update={"slo_seconds": s * base}), capacities=capacities).slo_attainment
                               for s in SCALES]
                scale = lowest_scale(list(SCALES), attainments)
                cells.append(f"{scale:.2f}x (capacity {sum(capacities):.1f})" if scale != float("inf") else
                             f"never (capacity {sum(capacities):.1f})")
            print(f"| {runtime.name} | {rate:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
