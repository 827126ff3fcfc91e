"""Scoring device partitions: each group of a partition becomes a replica laid out by the DP, and the
partition's fitness is the simulated SLO attainment of the resulting deployment.

A partition is a tuple of groups; a group is a sorted tuple of (node index, device count). Devices of
one node are interchangeable, so this canonical form is what the search and its caches key on. A group
no layout fits (memory) stays idle; a partition with no feasible group is infeasible.
"""

from __future__ import annotations

from dataclasses import dataclass

from hexcore.config import EngineSpec
from planning.inputs.cluster import Cluster
from planning.cost.stage_cost import USABLE_MEMORY_FRACTION
from planning.search.replica_dp import Group, ReplicaLayout, ReplicaPlanner
from planning.inputs.models import ModelSpec
from planning.placement import DeploymentPlan, ReplicaPlan, StagePlan
from planning.cost.replica_cost import ReplicaCost, replica_cost
from planning.simulate.simulator import Predicted, simulate
from planning.inputs.workload import WorkloadSpec, make_requests

Partition = tuple[Group, ...]
Fitness = tuple[float, float]  # (SLO attainment, -mean latency); infeasible: (-1, -inf)
INFEASIBLE: Fitness = (-1.0, float("-inf"))


def canonical(groups) -> Partition:
    """Sorted groups of sorted (node, count) pairs, dropping empty entries."""
    cleaned = []
    for group in groups:
        pairs = tuple(sorted((n, c) for n, c in dict(group).items() if c > 0))
        if pairs:
            cleaned.append(pairs)
    return tuple(sorted(cleaned))


class PartitionScorer:
    """Lays out and simulates partitions for one (cluster, model, workload), caching both steps."""

    def __init__(
        self, cluster: Cluster, model: ModelSpec, workload: WorkloadSpec,
        engine: EngineSpec | None = None, is_symmetric: bool = False, num_sim_requests: int | None = None,
    ):
        self.cluster, self.model, self.workload = cluster, model, workload
        self.engine = engine or EngineSpec()
        self.replica_planner = ReplicaPlanner(
            cluster, model, self.engine, workload.mean_prompt_len, workload.mean_output_len,
            workload.max_total_len, is_symmetric,
        )
        search_workload = workload.model_copy(update={"num_requests": num_sim_requests or workload.num_requests})
        self.search_workload = search_workload
        self.requests = make_requests(search_workload)
        self._fitness: dict[Partition, tuple[Fitness, Predicted | None]] = {}

    @property
    def num_evaluated(self) -> int:
        return len(self._fitness)

    def layouts(self, partition: Partition) -> list[tuple[Group, ReplicaLayout]]:
        """The feasible groups of the partition with their DP layouts."""
        return [(g, layout) for g in partition if (layout := self.replica_planner.best(g)) is not None]

    def fitness(self, partition: Partition) -> Fitness:
        return self.evaluate(partition)[0]

    def evaluate(self, partition: Partition) -> tuple[Fitness, Predicted | None]:
        layouts = self.layouts(partition)
        key = tuple(g for g, _ in layouts)
        if key not in self._fitness:
            if not layouts:  # pruned: nothing to simulate
                self._fitness[key] = (INFEASIBLE, None)
            else:
                predicted = simulate(self.costs(layouts), self.search_workload, self.requests)
                self._fitness[key] = ((predicted.slo_attainment, -predicted.mean_latency_s), predicted)
        return self._fitness[key]

    def costs(self, layouts: list[tuple[Group, ReplicaLayout]]) -> list[ReplicaCost]:
        plan = self.to_plan(layouts)
        return [replica_cost(self.cluster, self.model, r, self.engine) for r in plan.replicas]

    def to_plan(self, layouts: list[tuple[Group, ReplicaLayout]]) -> DeploymentPlan:
        """Give every stage concrete devices: each node's devices are handed out in index order."""
        next_index = [0] * len(self.cluster.nodes)
        replicas = []
        for _, layout in layouts:
            stages = []
            for stage in layout.stages:
                first = next_index[stage.node]
                next_index[stage.node] += stage.tp
                stages.append(StagePlan(tuple((stage.node, first + k) for k in range(stage.tp)), stage.layers))
            replicas.append(ReplicaPlan(tuple(stages)))
        return DeploymentPlan(tuple(replicas))

    def infeasible_reason(self) -> str:
        usable = sum(n.device.memory_gb * n.count for n in self.cluster.nodes) * USABLE_MEMORY_FRACTION
        weights = self.model.weight_bytes / 1e9
        if usable < weights:
            return (
                f"{self.model.name} needs {weights:.1f} GB of weights ({self.model.dtype}) but the pool has only "
                f"{usable:.1f} GB of usable device memory"
            )
        if self.replica_planner.is_symmetric:
            return (
                f"no symmetric layout of {self.model.name} (one TP degree and the same layer count in every stage) "
                "fits in the devices' memory"
            )
        return (
            f"no replica layout of {self.model.name} fits: with TP groups limited to same-type devices on one node "
            f"(TP degrees {self.model.valid_tp_degrees()}), some stage always exceeds its devices' memory"
        )


def all_partitions(cluster: Cluster) -> list[Partition]:
    """Every grouping of the pool's devices (exhaustive baseline; small pools only)."""
    devices = [node.index for node in cluster.nodes for _ in range(node.count)]
    found: set[Partition] = set()

    def extend(i: int, groups: list[list[int]]) -> None:
        if i == len(devices):
            found.add(canonical([_counts(g) for g in groups]))
            return
        for group in groups:
            group.append(devices[i])
            extend(i + 1, groups)
            group.pop()
        groups.append([devices[i]])
        extend(i + 1, groups)
        groups.pop()

    extend(0, [])
    return sorted(found)


def _counts(nodes: list[int]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for n in nodes:
        counts[n] = counts.get(n, 0) + 1
    return counts


@dataclass(frozen=True)
class SearchResult:
    plan: DeploymentPlan
    partition: Partition
    fitness: Fitness
    predicted: Predicted  # on the full workload
    replica_throughputs_rps: tuple[float, ...]
    search_seconds: float
    num_evaluated: int
