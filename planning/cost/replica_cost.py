"""A replica as the cost model sees it: its stages' step-time models, links, memory and capacity."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hexcore.config import EngineSpec
from planning.inputs.cluster import Cluster
from planning.cost.stage_cost import (
    StageCost,
    USABLE_MEMORY_FRACTION,
    activation_send_time,
    kv_capacity_tokens,
    slowest,
    weight_bytes_per_device,
    workspace_bytes_per_device,
)
from planning.inputs.catalog import LinkSpec
from planning.inputs.models import ModelSpec
from planning.placement import ReplicaPlan


@dataclass(frozen=True)
class ReferenceStep:
    """One micro-batch step of a saturated replica: `micro_batch` sequences decoding one token each at
    the mean context `prompt_len + output_len / 2`, plus the prompts of `num_admitted` new requests."""

    num_tokens: float
    attended_pairs: float
    kv_read_tokens: float
    num_sampled: float

    @classmethod
    def of(cls, micro_batch: float, prompt_len: float, output_len: float, num_admitted: float | None = None,
           max_tokens: float = float("inf")) -> "ReferenceStep":
        """`num_admitted` default: the average share, micro_batch / output_len (each sequence is replaced
        once per output_len steps). Prefill tokens beyond `max_tokens` (the step's budget) wait."""
        if num_admitted is None:
            num_admitted = micro_batch / output_len
        prefill_tokens = max(0.0, min(num_admitted * prompt_len, max_tokens - micro_batch))
        context = prompt_len + output_len / 2
        return cls(
            num_tokens=micro_batch + prefill_tokens,
            attended_pairs=micro_batch * context + prefill_tokens * prompt_len / 2,
            kv_read_tokens=micro_batch * context + prefill_tokens,
            num_sampled=micro_batch + prefill_tokens / prompt_len,
        )

    @classmethod
    def mixture(cls, micro_batch: float, prompt_len: float, output_len: float,
                max_tokens: float) -> list[tuple[float, "ReferenceStep"]]:
        """The steps of a saturated replica as the engine forms them, with their probabilities: a step
        carries its sequences' decodes and the whole prompts of the requests admitted in their place,
        a Poisson number with mean micro_batch / output_len. The average of step times over this mixture
        exceeds the time of the average step where prompts tip a step from the weight scan into
        compute (the roofline is convex): what an evenly spread prefill would miss."""
        mean = micro_batch / output_len
        top = int(mean + 6 * math.sqrt(mean) + 6)
        weights = [math.exp(-mean + k * math.log(mean) - math.lgamma(k + 1)) if mean > 0 else float(k == 0)
                   for k in range(top + 1)]
        total = sum(weights)
        return [(w / total, cls.of(micro_batch, prompt_len, output_len, k, max_tokens))
                for k, w in enumerate(weights) if w / total > 1e-6]


def mixture_round_time(
    weights: list[float], stage_times: list[list[float]], send_times: list[list[float]], return_time: float,
    num_micro_batches: int,
) -> float:
    """round_time over a mixture of steps (per step kind k: probability weights[k], its time on every
    stage stage_times[k], its transfers send_times[k]). Each stage serves every micro-batch once per
    round: M x its mean step time. And each micro-batch's round trip must fit in the round, so with
    M micro-batches of independent kinds the round is at least the expected longest of M round trips:
    a stage that finishes a short step waits for the long one ahead of it in the pipeline."""
    num_stages = len(stage_times[0])
    mean_stage = [sum(w * times[j] for w, times in zip(weights, stage_times)) for j in range(num_stages)]
    trips = sorted(
        (sum(times) + sum(sends) + return_time, w) for w, times, sends in zip(weights, stage_times, send_times)
    )
    expected_longest, below = 0.0, 0.0
    for trip, w in trips:  # E[max of M draws] = sum of trip * (F(trip)^M - F(previous)^M)
        expected_longest += trip * ((below + w) ** num_micro_batches - below ** num_micro_batches)
        below += w
    return max(num_micro_batches * max(mean_stage), expected_longest)


def round_time(stage_times: list[float], send_times: list[float], return_time: float) -> float:
    """Time for every micro-batch (one per stage) to make one step: the bottleneck stage serves all
    S micro-batches, and one micro-batch must cross the whole pipeline and come back:
    max(S * max stage time, sum of stage and transfer times + the return hop)."""
    pipeline = sum(stage_times) + sum(send_times) + return_time
    return max(len(stage_times) * max(stage_times), pipeline)


@dataclass(frozen=True)
class ReplicaCost:
    stages: tuple[StageCost, ...]
    layers: tuple[int, ...]
    send_links: tuple[LinkSpec, ...]  # stage j leader -> stage j+1 leader
    return_link: LinkSpec  # last stage -> first stage (sampled token ids)
    kv_capacity_tokens: int  # per replica: the smallest stage's capacity
    engine: EngineSpec

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_micro_batches(self) -> int:
        return self.engine.num_micro_batches or self.num_stages

    def max_batch(self, max_total_len: int) -> int:
        """Sequences of `max_total_len` tokens that can run at once (KV capacity, max_num_seqs)."""
        return max(0, min(self.engine.max_num_seqs, self.kv_capacity_tokens // max_total_len))

    def round_seconds(self, batch: int, prompt_len: float, output_len: float) -> float:
        micro_batch = batch / self.num_micro_batches
        steps = ReferenceStep.mixture(micro_batch, prompt_len, output_len, self.engine.max_num_batched_tokens)
        model = self.stages[0].model
        times = [[s.step_time(l, step.num_tokens, step.attended_pairs, step.kv_read_tokens, step.num_sampled)
                  for s, l in zip(self.stages, self.layers)] for _, step in steps]
        sends = [[activation_send_time(model, step.num_tokens, link) for link in self.send_links] for _, step in steps]
        return_time = self.return_link.latency_s if self.num_stages > 1 else 0.0
        return mixture_round_time([w for w, _ in steps], times, sends, return_time, self.num_micro_batches)

    def throughput_rps(self, prompt_len: float, output_len: float, max_total_len: int) -> float:
        """Saturated throughput: `batch` sequences each gain one token per round."""
        batch = self.max_batch(max_total_len)
        if batch == 0:
            return 0.0
        return batch / (self.round_seconds(batch, prompt_len, output_len) * output_len)


def replica_cost(cluster: Cluster, model: ModelSpec, replica: ReplicaPlan, engine: EngineSpec) -> ReplicaCost:
    """Step-time models and KV capacity of a replica placed on the cluster (raises on a memory misfit)."""
    problems = memory_problems(cluster, model, replica, engine)
    if problems:
        raise ValueError("; ".join(problems))
    num_stages = len(replica.stages)
    stages, capacities = [], []
    for j, stage in enumerate(replica.stages):
        device = slowest([cluster.nodes[node].device for node, _ in stage.devices])
        cost = StageCost(model, device, stage.tp, group_link(cluster, stage.nodes), j == 0, j == num_stages - 1)
        stages.append(cost)
        capacities.append(
            kv_capacity_tokens(model, device, stage.tp, stage.layers, cost.is_first, cost.is_last,
                               engine.max_num_batched_tokens, engine.max_num_seqs)
        )
    leaders = [stage.devices[0][0] for stage in replica.stages]
    send_links = tuple(cluster.link(a, b) for a, b in zip(leaders, leaders[1:]))
    return ReplicaCost(
        tuple(stages), tuple(s.layers for s in replica.stages), send_links,
        cluster.link(leaders[-1], leaders[0]), min(capacities), engine,
    )


def group_link(cluster: Cluster, nodes: tuple[int, ...]) -> LinkSpec:
    """The slowest link inside a TP group (the one a ring all-reduce waits for)."""
    links = [cluster.link(a, b) for a in nodes for b in nodes]
    return min(links, key=lambda link: (link.bandwidth_gbps, -link.latency_ms))


def memory_problems(
    cluster: Cluster, model: ModelSpec, replica: ReplicaPlan, engine: EngineSpec, min_kv_tokens: int = 1
) -> list[str]:
    """Why each stage of the replica does not fit: weights + workspace + KV for `min_kv_tokens` tokens."""
    problems = []
    num_stages = len(replica.stages)
    for j, stage in enumerate(replica.stages):
        is_first, is_last = j == 0, j == num_stages - 1
        for node, local in stage.devices:
            device = cluster.nodes[node].device
            capacity = kv_capacity_tokens(model, device, stage.tp, stage.layers, is_first, is_last,
                                          engine.max_num_batched_tokens, engine.max_num_seqs)
            if capacity < min_kv_tokens:
                weights = weight_bytes_per_device(model, stage.tp, stage.layers, is_first, is_last) / 1e9
                workspace = workspace_bytes_per_device(model, stage.tp, engine.max_num_batched_tokens,
                                                       engine.max_num_seqs, is_last) / 1e9
                usable = device.memory_gb * USABLE_MEMORY_FRACTION
                problems.append(
                    f"stage {j} ({stage.layers} layers, TP {stage.tp}) on {cluster.nodes[node].name}/{local} "
                    f"({cluster.nodes[node].gpu}): {weights:.1f} GB weights + {workspace:.1f} GB workspace "
                    f"leave no room for {min_kv_tokens} KV tokens in {usable:.1f} GB usable"
                )
                break
    return problems
