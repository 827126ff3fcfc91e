"""Scheduling time of `hexgen plan`'s search against pool size (16 / 58 / 128 / 256 GPUs).

    .venv/bin/python -m planning.experiments.scaling [--sizes 16 58 128 256]

Pools: the 58-GPU pool of configs/clusters/paper-heterogeneous-58gpu.yaml as is, or its nodes repeated
with fresh site names (copies of its four sites, same links) and cut to the size. Model Llama-2-70B,
the paper's trace at 0.5 req/s per GPU, deadline 20 s; the search uses `hexgen plan`'s defaults.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import yaml

from planning.inputs.cluster import ClusterSpec, build_cluster
from planning.search.genetic import SearchParams, search
from planning.inputs.models import load_model
from planning.inputs.workload import load_workload

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def scaled_pool(num_gpus: int):
    raw = yaml.safe_load((CONFIGS / "clusters" / "paper-heterogeneous-58gpu.yaml").read_text())
    nodes, overrides, copy = [], [], 0
    while sum(n["count"] for n in nodes) < num_gpus:
        for node in raw["nodes"]:
            left = num_gpus - sum(n["count"] for n in nodes)
            if left <= 0:
                break
            nodes.append({**node, "name": f"{node['name']}-{copy}", "site": f"{node['site']}-{copy}",
                          "count": min(node["count"], left)})
        overrides += [{**o, "sites": [f"{s}-{copy}" for s in o["sites"]]} for o in raw["links"]["overrides"]]
        copy += 1
    sites = {n["site"] for n in nodes}
    links = {**raw["links"], "overrides": [o for o in overrides if set(o["sites"]) <= sites]}
    return build_cluster(ClusterSpec.model_validate({"nodes": nodes, "links": links}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 58, 128, 256])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_model("llama-2-70b")
    trace = load_workload(CONFIGS / "workloads" / "paper-llama2-70b.yaml")
    params = SearchParams(seed=args.seed, num_sim_requests=64)  # hexgen plan's defaults
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print("| GPUs | nodes | sites | rate (req/s) | search (s) | partitions evaluated | replicas | GPUs used | SLO attainment |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        cluster = scaled_pool(size)
        workload = trace.model_copy(update={"rate": 0.5 * size})
        started = time.perf_counter()
        result = search(cluster, model, workload, params)
        elapsed = time.perf_counter() - started
        used = sum(len(r.devices) for r in result.plan.replicas)
        print(f"| {size} | {len(cluster.nodes)} | {len(cluster.sites)} | {workload.rate:g} | {elapsed:.1f} | "
              f"{result.num_evaluated} | {len(result.plan.replicas)} | {used} | {result.predicted.slo_attainment:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
