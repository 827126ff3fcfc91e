"""The fidelity check: the cost model and simulator against the real engine, on the same trace.

For each deployment of SmolLM2 that fits this machine, the predicted side is
- per step: the cost model's time of every step the engine actually ran (its exact token counts and
  contexts), summed over the stages, against the workers' measured compute time of that step;
- serving: the simulator replaying the trace (throughput, TTFT and TPOT percentiles).
Each figure is reported as predicted / measured. TP2 is not among the deployments: SmolLM2 has 9
attention heads and 3 KV heads, so a TP degree must divide 3 (the deployment contract rejects TP2).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from hexcore.config import DeploymentConfig, EngineSpec, ReplicaSpec, StageSpec
from planning.inputs.cluster import ClusterSpec, LinksSpec, NodeSpec, build_cluster
from planning.inputs.catalog import DeviceFile, DeviceSpec
from planning.simulate.evaluate import replica_costs
from planning.fidelity.replay import Measurement, StepTokens
from planning.inputs.models import load_model
from planning.placement import plan_from_config
from planning.cost.replica_cost import ReplicaCost
from planning.simulate.simulator import Predicted, simulate
from planning.inputs.workload import Request, WorkloadSpec

MODEL = "smollm2-135m"
# One single-thread worker per device, as calibrated; no prefix caching (random prompts share nothing);
# a KV cache sized for the trace, not for the whole RAM.
ENGINE = EngineSpec(num_threads_per_worker=1, enable_prefix_caching=False, num_kv_blocks=1024)


def replica(*stages: tuple[int, int]) -> ReplicaSpec:
    """A replica from (TP degree, layers) pairs."""
    return ReplicaSpec(stages=[StageSpec(devices=["cpu"] * tp, layers=layers) for tp, layers in stages])


# name (as printed) -> replicas
DEPLOYMENTS: dict[str, list[ReplicaSpec]] = {
    "TP1": [replica((1, 30))],
    "TP1+TP1": [replica((1, 15), (1, 15))],  # two pipeline stages of 15 layers
    "TP3": [replica((3, 30))],
    "TP3:20+TP1:10": [replica((3, 20), (1, 10))],
    "2xTP1": [replica((1, 30)), replica((1, 30))],  # two replicas
}

METRICS = ("prefill step ms", "decode step ms", "throughput req/s", "TTFT p50 s", "TTFT p99 s",
           "TPOT p50 ms", "TPOT p99 ms")


def deployment_config(name: str) -> DeploymentConfig:
    if name not in DEPLOYMENTS:
        raise ValueError(f"unknown deployment {name!r}; known: {', '.join(DEPLOYMENTS)}")
    return engine_config(DEPLOYMENTS[name])


def engine_config(replicas: list[ReplicaSpec], dtype: str = "float32") -> DeploymentConfig:
    """The default model served by `replicas` with the fidelity check's engine settings (ENGINE)."""
    return DeploymentConfig(model="default", dtype=dtype, max_model_len=1024, replicas=replicas, engine=ENGINE)


def shared_device(device: DeviceSpec, num_workers: int, num_cores: int) -> DeviceSpec:
    """One worker as a device when `num_workers` single-thread workers share `num_cores` cores.

    The workers of a TP group wait for one another twice per layer, far more often than the OS
    switches threads (milliseconds), so they do not each get cores / workers of a core: they advance
    in rounds, `cores` of them computing while the rest wait, and a stretch of work between two waits
    takes ceil(workers / cores) times as long (3 workers on 2 cores: 2x, not 1.5x). Rates shrink and
    fixed costs grow by that factor. The fidelity check applies it to all of a deployment's workers;
    for its deployments that is exact or the same as cores / workers (TP3; 4 workers on 2 cores,
    where the two agree; 2 workers on 2 cores, where both are 1). Independent workers (replicas or
    stages that rarely wait for each other) beyond the cores would be time-sliced: cores / workers."""
    share = 1.0 / math.ceil(num_workers / num_cores)
    if share == 1.0:
        return device
    return device.model_copy(update={
        "tflops": device.tflops * share, "mem_bandwidth_gbs": device.mem_bandwidth_gbs * share,
        "overhead_ms_per_layer": device.overhead_ms_per_layer / share,
        "overhead_ms_per_step": device.overhead_ms_per_step / share,
        "overhead_us_per_kv_token": device.overhead_us_per_kv_token / share,
    })


def predicted_costs(config: DeploymentConfig, device_file: DeviceFile, num_cores: int | None = None) -> list[ReplicaCost]:
    """The replicas' cost models on a pool of as many calibrated cpu devices as the deployment has
    workers, sharing this machine's cores (`num_cores`, default all)."""
    num_workers = sum(r.num_workers for r in config.replicas)
    device = shared_device(device_file.device(), num_workers, num_cores or os.cpu_count() or 1)
    spec = ClusterSpec(gpus={"local-cpu": device},
                       nodes=[NodeSpec(name="local", gpu="local-cpu", count=num_workers)],
                       links=LinksSpec(intra_node=device_file.link))
    cluster = build_cluster(spec)
    model = load_model(MODEL).with_dtype(config.dtype)
    return replica_costs(cluster, model, config, plan_from_config(config, cluster))


def as_planned(config: DeploymentConfig, costs: list[ReplicaCost], workload: WorkloadSpec) -> DeploymentConfig:
    """The deployment as `hexgen plan` writes it: every replica carries its predicted saturated
    throughput, by which the engine's router weighs replicas, as the simulator does. (Without it
    the router measures each replica's tokens per busy second, which rises with the replica's own
    load: identical replicas then drift apart by noise.)"""
    replicas = [replica.model_copy(update={"predicted_throughput_rps": cost.throughput_rps(
                    workload.mean_prompt_len, workload.mean_output_len, workload.max_total_len)})
                for replica, cost in zip(config.replicas, costs)]
    return config.model_copy(update={"replicas": replicas})


def step_seconds(cost: ReplicaCost, shape: StepTokens) -> float:
    """The cost model's compute time of one engine step, summed over the stages.

    attended pairs: a sequence with q new tokens after c - q cached ones computes q * (c - q) + q(q+1)/2
    (query, key) pairs; KV read: each sequence's context c."""
    tokens = sum(shape.query_lens)
    pairs = sum(q * (c - q) + q * (q + 1) / 2 for q, c in zip(shape.query_lens, shape.context_lens))
    kv_read = sum(shape.context_lens)
    return sum(stage.step_time(layers, tokens, pairs, kv_read, shape.num_sampled)
               for stage, layers in zip(cost.stages, cost.layers))


@dataclass(frozen=True)
class Figures:
    """One side (predicted or measured) of a deployment's comparison, in the units of METRICS."""

    values: dict[str, float]

    @classmethod
    def serving(cls, arrival, first_token, finish, num_outputs, prefill_s: float, decode_s: float) -> "Figures":
        """The simulator's definitions: throughput = finished / (last finish - first arrival); TTFT from
        arrival; TPOT = (finish - first token) / (outputs - 1) over requests of 2+ tokens."""
        arrival, first_token, finish = map(np.asarray, (arrival, first_token, finish))
        outputs = np.asarray(num_outputs)
        ttft, multi = first_token - arrival, outputs > 1
        tpot = (finish - first_token)[multi] / (outputs[multi] - 1)
        return cls({
            "prefill step ms": prefill_s * 1e3,
            "decode step ms": decode_s * 1e3,
            "throughput req/s": len(finish) / (finish.max() - arrival.min()),
            "TTFT p50 s": float(np.percentile(ttft, 50)),
            "TTFT p99 s": float(np.percentile(ttft, 99)),
            "TPOT p50 ms": float(np.percentile(tpot, 50)) * 1e3,
            "TPOT p99 ms": float(np.percentile(tpot, 99)) * 1e3,
        })


def compare(costs: list[ReplicaCost], config: DeploymentConfig, requests: list[Request],
            measurement: Measurement) -> tuple[Figures, Figures]:
    """(predicted, measured) figures of one engine run of `requests`."""
    names = config.replica_names
    steps = {True: ([], []), False: ([], [])}  # is_prefill -> (predicted, measured) step seconds
    for step in measurement.steps:
        predicted, measured = steps[step.shape.is_prefill]
        predicted.append(step_seconds(costs[names.index(step.replica)], step.shape))
        measured.append(sum(step.stage_seconds.values()))
    median = {key: tuple(float(np.median(v)) if v else math.nan for v in pair) for key, pair in steps.items()}
    workload = WorkloadSpec(rate=1.0, trace=[(r.prompt_len, r.output_len) for r in requests], slo_seconds=1e9,
                            num_requests=len(requests))
    sim: Predicted = simulate(costs, workload, requests)
    predicted = Figures({
        "prefill step ms": median[True][0] * 1e3,
        "decode step ms": median[False][0] * 1e3,
        "throughput req/s": sim.throughput_rps,
        "TTFT p50 s": sim.p50_ttft_s, "TTFT p99 s": sim.p99_ttft_s,
        "TPOT p50 ms": sim.p50_tpot_s * 1e3, "TPOT p99 ms": sim.p99_tpot_s * 1e3,
    })
    r = measurement.requests
    measured = Figures.serving([t.arrival for t in r], [t.first_token for t in r], [t.finish for t in r],
                               [t.num_output_tokens for t in r], median[True][1], median[False][1])
    return predicted, measured


@dataclass(frozen=True)
class Row:
    deployment: str
    metric: str
    predicted: float
    measured: float  # mean over runs
    spread: float  # (max - min) / mean over runs

    @property
    def ratio(self) -> float:
        return self.predicted / self.measured

    @property
    def error(self) -> float:
        """|predicted - measured| / measured."""
        return abs(self.ratio - 1.0)


def rows_of(deployment: str, predicted: list[Figures], measured: list[Figures]) -> list[Row]:
    """One row per metric; predicted and measured averaged over the runs."""
    rows = []
    for metric in METRICS:
        p = [f.values[metric] for f in predicted]
        m = [f.values[metric] for f in measured]
        mean = float(np.mean(m))
        rows.append(Row(deployment, metric, float(np.mean(p)), mean, (max(m) - min(m)) / mean if mean else 0.0))
    return rows


def summary(rows: list[Row]) -> tuple[float, float]:
    """(median, max) relative error over the rows that have both figures."""
    errors = [row.error for row in rows if math.isfinite(row.error)]
    return float(np.median(errors)), float(max(errors))


def markdown_table(rows: list[Row]) -> str:
    lines = ["| deployment | metric | predicted | measured | spread | predicted / measured |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.deployment} | {row.metric} | {row.predicted:.3g} | {row.measured:.3g} | "
                     f"{row.spread:.0%} | {row.ratio:.2f} |")
    median_error, max_error = summary(rows)
    lines.append("")
    lines.append(f"median |error| {median_error:.0%}, worst {max_error:.0%} (target: median <= 15%, none > 30%)")
    return "\n".join(lines)
