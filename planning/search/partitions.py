"""Scoring device partitions: each group of a partition becomes a replica laid out by the DP, and the
partition's fitness is its SLO attainment in steady state, then its headroom, then its mean latency.

- Capacity: every replica's saturated throughput (planning.simulate.capacity: the replica alone under
  a queue, simulated once per layout, cached by the layout's cost model, and only for groups of
  partitions that survive the bound below). Their sum is the most the plan serves in steady
  state: above it the queue grows without bound, so at most capacity / rate of the requests can meet
  any deadline.
- Steady-state attainment = simulated attainment x min(1, capacity / rate), the simulation replaying
  at least FIT_WINDOW_DEADLINES deadlines of arrivals at the target rate (up to MAX_FIT_REQUESTS), the
  same requests for every candidate (common random numbers), rounded to ATTAINMENT_RESOLUTION: plans
  within that of each other tie.
- Ties go to headroom (the total capacity: the highest rate the plan can sustain), then to the lower
  mean latency.
- Branch and bound, in two steps. First from the cost model alone: each group's capacity is at most
  its cost-model saturated throughput x (1 + CAPACITY_MARGIN), so min(1, that sum / rate) bounds the
  attainment and the sum bounds the headroom before anything is simulated; then from the simulated
  capacities. A partition that cannot beat the best one scored so far is not simulated: it keeps its
  bound as fitness (attainment bound, capacity or its bound, -inf latency), which ranks it below that
  best. The search scores partitions in order of their bound (genetic.rank), so the best come first
  and most others are never simulated, nor are their groups' saturation runs.

A partition is a tuple of groups; a group is a sorted tuple of (node index, device count). Devices of
one node are interchangeable, so this canonical form is what the search and its caches key on. A group
no layout fits (memory) stays idle; a partition with no feasible group is infeasible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hexcore.config import EngineSpec
from planning.inputs.cluster import Cluster
from planning.cost.stage_cost import USABLE_MEMORY_FRACTION
from planning.search.replica_dp import Group, ReplicaLayout, ReplicaPlanner
from planning.inputs.models import ModelSpec
from planning.placement import DeploymentPlan, ReplicaPlan, StagePlan
from planning.cost.replica_cost import ReplicaCost, replica_cost
from planning.simulate.capacity import saturated_throughput_rps, unloaded_latency_s
from planning.simulate.simulator import Predicted, simulate
from planning.inputs.workload import WorkloadSpec, make_requests

Partition = tuple[Group, ...]
Fitness = tuple[float, float, float]  # (steady-state SLO attainment, capacity req/s, -mean latency)
INFEASIBLE: Fitness = (-1.0, 0.0, float("-inf"))
ATTAINMENT_RESOLUTION = 0.01
FIT_WINDOW_DEADLINES = 2.0
MAX_FIT_REQUESTS = 3000
# the simulated saturated throughput of a replica stays within this of the cost model's figure
# (58-GPU pool, every layout a search lays out: simulated / cost model 0.91-1.05), so cost model x
# (1 + margin) bounds it from above: partitions and layouts under the bound are not simulated
CAPACITY_MARGIN = 0.10


def canonical(groups) -> Partition:
    """Sorted groups of sorted (node, count) pairs, dropping empty entries."""
    cleaned = []
    for group in groups:
        pairs = tuple(sorted((n, c) for n, c in dict(group).items() if c > 0))
        if pairs:
            cleaned.append(pairs)
    return tuple(sorted(cleaned))


class PartitionScorer:
    """Lays out, sizes and simulates partitions for one (cluster, model, workload), caching every step."""

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
        self.search_workload = workload.model_copy(update={"num_requests": fit_num_requests(workload, num_sim_requests)})
        self.requests = make_requests(self.search_workload)
        self._fitness: dict[Partition, tuple[Fitness, Predicted | None]] = {}
        self._capacity: dict[Group, float] = {}
        self._cost: dict[Group, ReplicaCost] = {}
        self._layout: dict[Group, ReplicaLayout | None] = {}
        self._option_cache: dict[Group, list[tuple[ReplicaLayout, ReplicaCost, float, bool]]] = {}
        self.best_fitness: Fitness = INFEASIBLE
        self.num_simulated = 0

    @property
    def num_evaluated(self) -> int:
        return len(self._fitness)

    def feasible(self, partition: Partition) -> tuple[Group, ...]:
        """The groups of the partition some layout fits (the DP alone; nothing simulated)."""
        return tuple(g for g in partition if self.replica_planner.shortlist(g))

    def layouts(self, partition: Partition) -> list[tuple[Group, ReplicaLayout]]:
        """The feasible groups of the partition with their chosen layouts."""
        return [(g, self.layout(g)) for g in self.feasible(partition)]

    def _options(self, group: Group) -> list[tuple[ReplicaLayout, ReplicaCost, float, bool]]:
        """The layouts the scorer chooses from, each with its cost model, the cost model's saturated
        throughput (analytic) and whether it serves the workload's longest request alone within the
        deadline: the DP's shortlist, and when none of it meets the deadline, every other layout the
        DP considers that does (the deadline is a constraint of the layout; only then, so that loose
        deadlines cost no more DP work)."""
        if group not in self._option_cache:
            options = [self._option(group, layout) for layout in self.replica_planner.shortlist(group)]
            if options and not any(fits for *_, fits in options):
                shortlist = {layout for layout, *_ in options}
                for layout in self.replica_planner.every_layout(group):
                    if layout not in shortlist and (option := self._option(group, layout))[3]:
                        options.append(option)
            self._option_cache[group] = options
        return self._option_cache[group]

    def _option(self, group: Group, layout: ReplicaLayout) -> tuple[ReplicaLayout, ReplicaCost, float, bool]:
        w = self.workload
        (replica,) = self.to_plan([(group, layout)]).replicas
        cost = replica_cost(self.cluster, self.model, replica, self.engine)
        estimate = cost.throughput_rps(w.mean_prompt_len, w.mean_output_len, w.max_total_len)
        return layout, cost, estimate, unloaded_latency_s(cost, w) <= w.slo_seconds

    def capacity_bound(self, group: Group) -> float:
        """An upper bound on the simulated saturated throughput of any layout the group may take:
        the cost model's figure plus CAPACITY_MARGIN."""
        return max((estimate for _, _, estimate, _ in self._options(group)), default=0.0) * (1 + CAPACITY_MARGIN)

    def layout(self, group: Group) -> ReplicaLayout | None:
        """Of the options (the DP's shortlist of round times within a few % of the shortest, widened
        when it misses the deadline), the layout that serves the workload's longest request alone
        within the deadline, then carries the most load (simulated saturated throughput), then comes
        first. Layouts whose capacity bound is below the best simulated so far are not simulated."""
        if group not in self._layout:
            options = self._options(group)
            candidates = [i for i, (*_, fits) in enumerate(options) if fits or not any(o[3] for o in options)]
            best, best_key = None, None
            for i in sorted(candidates, key=lambda i: (-options[i][2], i)):
                layout, cost, estimate, fits = options[i]
                if best_key is not None and estimate * (1 + CAPACITY_MARGIN) < best_key[1]:
                    break
                capacity = saturated_throughput_rps(cost, self.workload)
                key = (fits, capacity, -i)
                if best_key is None or key > best_key:
                    best, best_key = layout, key
                    self._cost[group], self._capacity[group] = cost, capacity
            self._layout[group] = best
        return self._layout[group]

    def fitness(self, partition: Partition) -> Fitness:
        return self.evaluate(partition)[0]

    def bound(self, partition: Partition) -> float:
        """Upper bound on the partition's capacity (req/s), from the cost model: nothing simulated."""
        return sum(self.capacity_bound(g) for g in self.feasible(partition))

    def capacity(self, group: Group) -> float:
        """Saturated throughput (req/s) of the group's replica as laid out (a feasible group)."""
        self.layout(group)
        return self._capacity[group]

    def group_cost(self, group: Group) -> ReplicaCost:
        self.layout(group)
        return self._cost[group]

    def evaluate(self, partition: Partition) -> tuple[Fitness, Predicted | None]:
        key = self.feasible(partition)
        if key not in self._fitness:
            self._fitness[key] = self._score(key)
        return self._fitness[key]

    def _score(self, groups: tuple[Group, ...]) -> tuple[Fitness, Predicted | None]:
        if not groups:  # pruned: nothing to simulate
            return INFEASIBLE, None
        best = self.best_fitness
        upper = sum(self.capacity_bound(g) for g in groups)
        if _pruned(_quantize(min(1.0, upper / self.workload.rate)), upper, best):  # before any simulation
            return (_quantize(min(1.0, upper / self.workload.rate)), upper, float("-inf")), None
        capacities = [self.capacity(g) for g in groups]
        total = sum(capacities)
        bound = _quantize(min(1.0, total / self.workload.rate))
        if _pruned(bound, total, best):
            return (bound, total, float("-inf")), None
        fitness, predicted = self.score([self.group_cost(g) for g in groups], capacities)
        self.best_fitness = max(best, fitness)
        return fitness, predicted

    def score(self, costs: list[ReplicaCost], capacities: list[float]) -> tuple[Fitness, Predicted]:
        """The fitness of any set of replicas, simulated on the search's trace (no pruning)."""
        self.num_simulated += 1
        total = sum(capacities)
        predicted = simulate(costs, self.search_workload, self.requests, capacities)
        share = min(1.0, total / self.workload.rate)
        return (_quantize(predicted.slo_attainment * share), total, -predicted.mean_latency_s), predicted

    def capacities(self, layouts: list[tuple[Group, ReplicaLayout]]) -> list[float]:
        return [self.capacity(g) for g, _ in layouts]

    def costs(self, layouts: list[tuple[Group, ReplicaLayout]]) -> list[ReplicaCost]:
        return [self.group_cost(g) for g, _ in layouts]

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


def fit_num_requests(workload: WorkloadSpec, num_sim_requests: int | None) -> int:
    """Requests per fitness simulation: `num_sim_requests` (default: the workload's), and at least
    FIT_WINDOW_DEADLINES deadlines of arrivals at the workload's rate (at most MAX_FIT_REQUESTS)."""
    steady = min(MAX_FIT_REQUESTS, math.ceil(workload.rate * workload.slo_seconds * FIT_WINDOW_DEADLINES))
    return max(num_sim_requests or workload.num_requests, steady)


def _pruned(attainment_bound: float, capacity: float, best: Fitness) -> bool:
    """A partition whose attainment bound and capacity (or their upper bounds) cannot beat `best`."""
    return attainment_bound < best[0] or (attainment_bound == best[0] and capacity < best[1])


def _quantize(attainment: float) -> float:
    return round(round(attainment / ATTAINMENT_RESOLUTION) * ATTAINMENT_RESOLUTION, 6)


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
    replica_throughputs_rps: tuple[float, ...]  # saturated, simulated (planning.simulate.capacity)
    search_seconds: float
    num_evaluated: int
    max_sustainable_rate_rps: float  # at the workload's deadline (planning.simulate.capacity)
