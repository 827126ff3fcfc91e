"""`hexgen plan` and `hexgen simulate`."""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from hexcore.config import DeploymentConfig, load_config
from hexcore.model.files import DEFAULT_MODEL
from planning.inputs.cluster import Cluster, load_cluster
from planning.simulate.evaluate import evaluate_deployment
from planning.search.genetic import SearchParams, one_replica, search
from planning.inputs.models import BUILTIN_MODELS, load_model
from planning.placement import write_plan_file
from planning.search.partitions import SearchResult
from planning.simulate.simulator import Predicted
from planning.inputs.workload import WorkloadSpec, load_workload

# built-in planner models whose weights `hexgen serve` knows by name
_SERVE_NAMES = {"smollm2-135m": DEFAULT_MODEL}


def register(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser("plan", help="choose a heterogeneous deployment for a cluster, model and workload")
    _add_inputs(plan)
    plan.add_argument("-o", "--output", required=True, help="deployment file to write")
    plan.add_argument("--seed", type=int, default=0, help="seed of the genetic search (default 0)")
    plan.add_argument("--json", action="store_true", help="print the plan and its predicted figures as JSON")
    plan.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                      help="default: float32 on a pool of cpu devices (the engine's cpu default), else the model's dtype")
    defaults = SearchParams()
    plan.add_argument("--population", type=int, default=defaults.population, help="candidates per generation")
    plan.add_argument("--generations", type=int, default=defaults.generations, help="maximum generations")
    plan.add_argument("--elites", type=int, default=defaults.num_elites, help="best candidates kept unchanged")
    plan.add_argument("--patience", type=int, default=defaults.patience, help="stop after N generations without gain")
    plan.add_argument("--sim-requests", type=int, default=64,
                      help="requests simulated per candidate, at least (default 64; the search simulates at least "
                           "two deadlines of arrivals at the workload's rate, up to 3000)")
    plan.add_argument("--symmetric", action="store_true", help="only symmetric replicas (same TP, same layers per stage)")
    plan.add_argument("--one-replica", action="store_true", help="one replica over every device (no genetic search)")
    plan.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    plan.set_defaults(func=run_plan)

    simulate = subparsers.add_parser("simulate", help="predict how a deployment file serves a workload")
    _add_inputs(simulate)
    simulate.add_argument("--plan", required=True, help="deployment file (written by `hexgen plan` or by hand)")
    simulate.add_argument("--json", action="store_true", help="print the predicted figures as JSON")
    simulate.set_defaults(func=run_simulate)


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", required=True, help="cluster YAML file")
    parser.add_argument("--model", required=True, help=f"built-in name ({', '.join(BUILTIN_MODELS)}) or HF config path")
    parser.add_argument("--workload", required=True, help="workload YAML file")


def run_plan(args: argparse.Namespace) -> int:
    cluster, workload = load_cluster(args.cluster), load_workload(args.workload)
    model = load_model(args.model)
    is_cpu_pool = all(node.device.kind == "cpu" for node in cluster.nodes)
    model = model.with_dtype(args.dtype or ("float32" if is_cpu_pool else model.dtype))
    params = SearchParams(
        population=args.population, generations=args.generations, num_elites=args.elites,
        patience=args.patience, seed=args.seed, num_sim_requests=args.sim_requests,
    )
    if args.one_replica:
        result = one_replica(cluster, model, workload, is_symmetric=args.symmetric)
    else:
        result = search(cluster, model, workload, params, is_symmetric=args.symmetric, show_progress=not args.no_progress)
    model_field = model.path or _SERVE_NAMES.get(model.name, model.name)
    comment = None if model.path or model.name in _SERVE_NAMES else (
        "built-in planner model: replace with the path to its HF weights directory"
    )
    config = result.plan.to_config(cluster, model_field, model.dtype, throughputs_rps=result.replica_throughputs_rps)
    write_plan_file(args.output, config, _header(args, cluster, workload, result), comment)
    if args.json:
        print(json.dumps(plan_json(config, result)))
    else:
        for line in _header(args, cluster, workload, result):
            print(line)
        print(f"wrote {args.output}")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    cluster, workload, model = load_cluster(args.cluster), load_workload(args.workload), load_model(args.model)
    evaluation = evaluate_deployment(cluster, model, load_config(args.plan), workload)
    if args.json:
        print(json.dumps({**evaluation.predicted.summary(),
                          "max_sustainable_rate_rps": round(evaluation.max_sustainable_rate_rps, 3)}))
    else:
        print(_describe(evaluation.predicted, workload))
        print(_sustainable(evaluation.max_sustainable_rate_rps, workload))
        for i, rps in enumerate(evaluation.replica_throughputs_rps):
            print(f"replica r{i}: predicted saturated throughput {rps:.2f} req/s")
    return 0


def plan_json(config: DeploymentConfig, result: SearchResult) -> dict:
    """The object `hexgen plan --json` prints."""
    return {
        "replicas": [
            {
                "stages": [{"devices": s.devices, "layers": s.layers, "tp": s.tp} for s in replica.stages],
                "predicted_throughput_rps": round(rps, 4),
            }
            for replica, rps in zip(config.replicas, result.replica_throughputs_rps)
        ],
        "predicted": result.predicted.summary(),
        "max_sustainable_rate_rps": round(result.max_sustainable_rate_rps, 3),
        "search_seconds": round(result.search_seconds, 3),
    }


def _describe(predicted: Predicted, workload: WorkloadSpec) -> str:
    p = predicted
    return (
        f"predicted: SLO attainment {p.slo_attainment:.3f} (deadline {workload.slo_seconds:g} s at {workload.rate:g} req/s), "
        f"throughput {p.throughput_rps:.3f} req/s, E2E p50 {p.p50_latency_s:.3f} s p99 {p.p99_latency_s:.3f} s, "
        f"TTFT p50 {p.p50_ttft_s:.3f} s p99 {p.p99_ttft_s:.3f} s, TPOT p50 {p.p50_tpot_s * 1e3:.1f} ms "
        f"p99 {p.p99_tpot_s * 1e3:.1f} ms ({p.num_requests} simulated requests)"
    )


def _sustainable(rate: float, workload: WorkloadSpec) -> str:
    return (f"highest sustainable rate: {rate:.2f} req/s at the {workload.slo_seconds:g} s deadline "
            f"(steady state, >= 90% attainment)")


def _header(args, cluster: Cluster, workload: WorkloadSpec, result: SearchResult) -> list[str]:
    today = datetime.date.today().isoformat()
    used = sum(len(r.devices) for r in result.plan.replicas)
    lines = [
        f"Planned by `hexgen plan` on {today}: cluster {args.cluster}, model {args.model}, workload {args.workload}, seed {args.seed}",
        f"{used} of {cluster.num_devices} devices used in {len(result.plan.replicas)} replicas; "
        f"search {result.search_seconds:.1f} s over {result.num_evaluated} partitions",
        _describe(result.predicted, workload),
        _sustainable(result.max_sustainable_rate_rps, workload),
    ]
    for i, (replica, rps) in enumerate(zip(result.plan.replicas, result.replica_throughputs_rps)):
        tps = "/".join(str(s.tp) for s in replica.stages)
        layers = "/".join(str(s.layers) for s in replica.stages)
        lines.append(f"replica r{i}: TP {tps}, layers {layers}, predicted saturated throughput {rps:.2f} req/s")
    return lines


if __name__ == "__main__":
    from server.entrypoint import main

    sys.exit(main(["plan", *sys.argv[1:]]))
