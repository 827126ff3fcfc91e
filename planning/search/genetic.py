"""Across the pool: a genetic search over partitions of the devices into replicas.

- Initial population, first the splits a person would try: every node cut into equal TP groups of each
  valid size that holds the model (8 GPUs: 1x8, 2x4, ...; sizes that do not fit leave the node whole),
  and every node cut into its smallest such groups (most replicas). Then clustering the link matrix:
  nodes are merged by single linkage on link cost (latency + transfer time of 1 MB), and every level
  of that hierarchy is taken as is and cut into replicas just big enough to hold the model (at a few
  memory slacks).
- Mutations: merge two groups, split one at random or into halves (a TP8 node into two TP4 replicas),
  move devices of one node from a group to another.
- Groups that cannot hold the model are pruned by the DP's memory bound before anything is simulated.
- Elitism: the best `num_elites` survive unchanged; parents are picked by tournament.
- Fitness: steady-state SLO attainment, then headroom (capacity), then lower mean latency
  (planning.search.partitions.PartitionScorer).
Seeded with `random.Random(seed)`: the same inputs give the same plan.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from hexcore.config import EngineSpec
from planning.inputs.cluster import Cluster
from planning.cost.stage_cost import USABLE_MEMORY_FRACTION
from planning.inputs.models import ModelSpec
from planning.search.partitions import Partition, PartitionScorer, SearchResult, all_partitions, canonical
from planning.simulate.capacity import max_sustainable_rate
from planning.simulate.simulator import simulate
from planning.inputs.workload import WorkloadSpec

MEMORY_SLACKS = (1.15, 1.5, 2.0, 3.0)  # replica sizes (x the weights) used to seed the population


@dataclass(frozen=True)
class SearchParams:
    population: int = 20
    generations: int = 30
    num_elites: int = 4
    tournament: int = 3
    patience: int = 8  # stop after this many generations without improvement
    seed: int = 0
    num_sim_requests: int | None = None  # requests per fitness simulation (default: the workload's)


def search(
    cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, params: SearchParams = SearchParams(),
    engine: EngineSpec | None = None, is_symmetric: bool = False, show_progress: bool = False,
    with_sustainable_rate: bool = True,
) -> SearchResult:
    """DP per replica + genetic search across replicas; raises ValueError when nothing fits. Without
    `with_sustainable_rate`, the result's max_sustainable_rate_rps is nan (its bisection skipped)."""
    started = time.perf_counter()
    scorer = PartitionScorer(cluster, model, workload, engine, is_symmetric, params.num_sim_requests)
    rng = random.Random(params.seed)
    splits = _unique(node_splits(cluster, model))[: params.population]
    seeds = [p for p in _unique(initial_population(cluster, model)) if p not in splits]
    room = params.population - len(splits)
    step = max(1, len(seeds) / room) if room > 0 else 1  # evenly over the clustering levels when there are many
    population = _unique(splits + [seeds[int(i * step)] for i in range(min(len(seeds), max(0, room)))])
    for _attempt in range(params.population * 10):  # small pools may have fewer distinct partitions
        if len(population) >= params.population:
            break
        population = _unique(population + [mutate(rng.choice(population), rng)])
    best, stale = None, 0
    for generation in tqdm(range(params.generations), desc="plan", unit="gen", file=sys.stderr, disable=not show_progress):
        ranked = rank(population, scorer)
        if best is None or scorer.fitness(ranked[0]) > scorer.fitness(best):
            best, stale = ranked[0], 0
        else:
            stale += 1
        if stale >= params.patience or generation + 1 == params.generations:
            break
        population = _next_generation(ranked, scorer, params, rng)
    return finish(scorer, best, started)


def rank(partitions: list[Partition], scorer: PartitionScorer) -> list[Partition]:
    """Best first. Scored in order of their capacity bound (cost model, nothing simulated), highest
    first, so that the best plans are simulated early and the rest are pruned by their bounds."""
    for partition in sorted(partitions, key=lambda p: (-scorer.bound(p), p)):
        scorer.fitness(partition)
    return sorted(partitions, key=lambda p: (scorer.fitness(p), p), reverse=True)


def _next_generation(
    ranked: list[Partition], scorer: PartitionScorer, params: SearchParams, rng: random.Random
) -> list[Partition]:
    """The elites unchanged, then mutated tournament winners until the population is full."""
    children = ranked[: params.num_elites]
    for _attempt in range(params.population * 10):
        if len(children) >= params.population:
            break
        contenders = rng.sample(ranked, min(params.tournament, len(ranked)))
        child = mutate(max(contenders, key=lambda p: (scorer.fitness(p), p)), rng)
        if child not in children:
            children.append(child)
    return children


def exhaustive(
    cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, engine: EngineSpec | None = None,
    is_symmetric: bool = False, num_sim_requests: int | None = None,
) -> SearchResult:
    """The best of every grouping of the devices (small pools only): the reference for the search."""
    started = time.perf_counter()
    scorer = PartitionScorer(cluster, model, workload, engine, is_symmetric, num_sim_requests)
    best = rank(all_partitions(cluster), scorer)[0]
    return finish(scorer, best, started)


def one_replica(
    cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, engine: EngineSpec | None = None,
    is_symmetric: bool = False,
) -> SearchResult:
    """A single replica over every device of the pool (the DP alone, as in the paper's case study)."""
    started = time.perf_counter()
    scorer = PartitionScorer(cluster, model, workload, engine, is_symmetric)
    everything = canonical([{node.index: node.count for node in cluster.nodes}])
    return finish(scorer, everything, started)


def finish(scorer: PartitionScorer, best: Partition, started: float, with_sustainable_rate: bool = True) -> SearchResult:
    fitness = scorer.fitness(best)
    if fitness[0] < 0:
        raise ValueError(f"infeasible pool: {scorer.infeasible_reason()}")
    layouts = scorer.layouts(best)
    costs, capacities = scorer.costs(layouts), scorer.capacities(layouts)
    workload = scorer.workload
    return SearchResult(
        plan=scorer.to_plan(layouts), partition=best, fitness=fitness,
        predicted=simulate(costs, workload, capacities=capacities), replica_throughputs_rps=tuple(capacities),
        search_seconds=time.perf_counter() - started, num_evaluated=scorer.num_evaluated,
        max_sustainable_rate_rps=max_sustainable_rate(costs, workload, capacities) if with_sustainable_rate else math.nan,
    )


def node_splits(cluster: Cluster, model: ModelSpec) -> list[Partition]:
    """Every node cut into its smallest equal TP groups that hold the model, then into equal groups of
    each valid TP degree (largest first); a node no such group fits stays whole."""
    def fits(node, tp: int) -> bool:
        return node.device.memory_bytes * tp * USABLE_MEMORY_FRACTION >= model.weight_bytes

    def split(tp_of) -> Partition:
        groups = []
        for node in cluster.nodes:
            tp = tp_of(node)
            if tp is None:
                groups.append({node.index: node.count})
                continue
            groups += [{node.index: tp} for _ in range(node.count // tp)]
            if node.count % tp:
                groups.append({node.index: node.count % tp})
        return canonical(groups)

    degrees = sorted(model.valid_tp_degrees())
    smallest = split(lambda node: next((t for t in degrees if t <= node.count and fits(node, t)), None))
    return [smallest] + [split(lambda node, t=t: t if t <= node.count and fits(node, t) else None) for t in degrees[::-1]]


def initial_population(cluster: Cluster, model: ModelSpec) -> list[Partition]:
    """Every level of a single-linkage clustering of the nodes by link cost, as is and cut into
    memory-sized replicas."""
    clusters = [[node.index] for node in cluster.nodes]
    levels = [[list(c) for c in clusters]]
    while len(clusters) > 1:
        pairs = [(i, j) for i in range(len(clusters)) for j in range(i + 1, len(clusters))]
        i, j = min(pairs, key=lambda ij: min(_link_cost(cluster, a, b) for a in clusters[ij[0]] for b in clusters[ij[1]]))
        clusters[i] = clusters[i] + clusters.pop(j)
        levels.append([list(c) for c in clusters])
    population = []
    for level in levels:
        population.append(canonical([{n: cluster.nodes[n].count for n in nodes} for nodes in level]))
        for slack in MEMORY_SLACKS:
            groups = [group for nodes in level for group in _cut(cluster, nodes, model.weight_bytes * slack)]
            population.append(canonical(groups))
    return population


def _link_cost(cluster: Cluster, a: int, b: int) -> float:
    link = cluster.link(a, b)
    return link.latency_s + 1e6 / link.bytes_per_second


def _cut(cluster: Cluster, nodes: list[int], target_bytes: float) -> list[dict[int, int]]:
    """Devices of the nodes, in order, cut into groups of at least `target_bytes` usable memory."""
    groups, current, memory = [], {}, 0.0
    for n in nodes:
        node = cluster.nodes[n]
        for _ in range(node.count):
            current[n] = current.get(n, 0) + 1
            memory += node.device.memory_bytes * USABLE_MEMORY_FRACTION
            if memory >= target_bytes:
                groups.append(current)
                current, memory = {}, 0.0
    if current:
        if groups:
            for n, c in current.items():
                groups[-1][n] = groups[-1].get(n, 0) + c
        else:
            groups.append(current)
    return groups


def mutate(partition: Partition, rng: random.Random) -> Partition:
    """One random merge, split or swap (a split when only one group exists and it can be split)."""
    groups = [dict(g) for g in partition]
    sizes = [sum(g.values()) for g in groups]
    moves = []
    if len(groups) >= 2:
        moves += ["merge", "swap"]
    if max(sizes) >= 2:
        moves += ["split", "halve"]
    if not moves:
        return partition
    move = rng.choice(moves)
    if move == "merge":
        i, j = rng.sample(range(len(groups)), 2)
        for n, c in groups[j].items():
            groups[i][n] = groups[i].get(n, 0) + c
        groups.pop(j)
    elif move == "split":
        i = rng.choice([k for k, size in enumerate(sizes) if size >= 2])
        while True:
            moved = {n: rng.randint(0, c) for n, c in groups[i].items()}
            if 0 < sum(moved.values()) < sizes[i]:
                break
        for n, c in moved.items():
            groups[i][n] -= c
        groups.append(moved)
    elif move == "halve":  # every node's devices of a group in two equal halves (odd: one more stays)
        i = rng.choice([k for k, size in enumerate(sizes) if size >= 2])
        half = {n: c // 2 for n, c in groups[i].items()}
        if sum(half.values()) == 0:
            half = {max(groups[i], key=groups[i].get): 1}
        for n, c in half.items():
            groups[i][n] -= c
        groups.append(half)
    else:  # swap: move some devices of one node from group i to group j
        i, j = rng.sample(range(len(groups)), 2)
        n = rng.choice(sorted(groups[i]))
        count = rng.randint(1, groups[i][n])
        groups[i][n] -= count
        groups[j][n] = groups[j].get(n, 0) + count
    return canonical(groups)


def _unique(partitions: list[Partition]) -> list[Partition]:
    return list(dict.fromkeys(partitions))
