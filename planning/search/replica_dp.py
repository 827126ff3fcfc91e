"""Per replica: a dynamic program choosing TP groups and contiguous layer counts for a device set.

The device set is a multiset of (node, count). Stage order follows the links: sites are chained in the
order that minimises the latency of the crossings, nodes of a site stay adjacent, so a replica crosses
each slow link at most once. Each node's devices are split into TP groups (same type, same node, TP
degree dividing the attention and KV heads); for every such choice, a min-max DP over (stage, layers
placed so far) assigns contiguous layer counts minimising the slowest stage's step time under each
device's memory limit. The choice with the shortest round time (see replica_cost.mixture_round_time) wins.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from hexcore.config import EngineSpec
from planning.inputs.cluster import Cluster
from planning.cost.stage_cost import (
    StageCost,
    USABLE_MEMORY_FRACTION,
    activation_send_time,
    kv_bytes_per_token_per_device,
    weight_bytes_per_device,
    workspace_bytes_per_device,
)
from planning.inputs.models import ModelSpec
from planning.cost.replica_cost import ReferenceStep, mixture_round_time

Group = tuple[tuple[int, int], ...]  # sorted (node index, device count) pairs: a replica's device set
MAX_TP_CHOICES = 128  # TP-group combinations evaluated per replica before restricting per-node options
SHORTLIST_MARGIN = 0.10  # layouts this close to the shortest round time are sized by simulation
SHORTLIST_SIZE = 3


@dataclass(frozen=True)
class StageLayout:
    node: int
    tp: int
    layers: int


@dataclass(frozen=True)
class ReplicaLayout:
    stages: tuple[StageLayout, ...]
    round_seconds: float  # at the reference batch


class ReplicaPlanner:
    """Best layout of a device group, cached per group (groups recur across the genetic search)."""

    def __init__(
        self, cluster: Cluster, model: ModelSpec, engine: EngineSpec,
        prompt_len: float, output_len: float, max_total_len: int, is_symmetric: bool = False,
    ):
        self.cluster, self.model, self.engine = cluster, model, engine
        self.prompt_len, self.output_len, self.max_total_len = prompt_len, output_len, max_total_len
        self.is_symmetric = is_symmetric
        self._cache: dict[Group, list[ReplicaLayout]] = {}

    def best(self, group: Group) -> ReplicaLayout | None:
        """The layout with the shortest round time, or None when no layout fits in memory."""
        shortlist = self.shortlist(group)
        return shortlist[0] if shortlist else None

    def shortlist(self, group: Group) -> list[ReplicaLayout]:
        """Layouts within SHORTLIST_MARGIN of the shortest round time (at most SHORTLIST_SIZE), shortest
        first: the candidates the scorer sizes by simulation (planning.search.partitions)."""
        if group not in self._cache:
            self._cache[group] = self._best_of(self._choices(group)) if self._may_fit(group) else []
        return self._cache[group]

    def _may_fit(self, group: Group) -> bool:
        """Early pruning: the group's usable memory must at least hold the weights."""
        usable = sum(self.cluster.nodes[n].device.memory_bytes * c for n, c in group) * USABLE_MEMORY_FRACTION
        return usable >= self.model.weight_bytes

    def every_layout(self, group: Group) -> list[ReplicaLayout]:
        """Every stage structure the DP considers for the group, each with its best layer counts
        (no pruning; for exhaustive checks on small pools), shortest round time first."""
        if not self._may_fit(group):
            return []
        layouts = []
        for reserve in (self.engine.max_num_seqs, 1):
            for stages in self._choices(group):
                layout = self._layout(stages, self._stage_terms(stages, reserve * self.max_total_len))
                if layout is not None and layout not in layouts:
                    layouts.append(layout)
            if layouts:
                break
        return sorted(layouts, key=lambda layout: (round(layout.round_seconds, 9), len(layout.stages)))

    def _choices(self, group: Group) -> list[list[tuple[int, int]]]:
        """Both directions of the node chain (which end holds the embedding, which the LM head) times
        every combination of per-node TP splits."""
        chain = self._ordered_nodes([n for n, _ in group])
        orders = [chain, chain[::-1]] if len(chain) > 1 else [chain]
        counts = dict(group)
        if self.is_symmetric:
            return [c for nodes in orders for c in self._symmetric_choices(nodes, counts)]
        options = {n: self._tp_splits(counts[n]) for n in chain}
        while math.prod(len(o) for o in options.values()) > MAX_TP_CHOICES:  # keep the largest-TP options
            widest = max(chain, key=lambda n: len(options[n]))
            options[widest] = options[widest][:-1]
        return [
            [(node, tp) for node, split in zip(nodes, combo) for tp in split]
            for nodes in orders
            for combo in itertools.product(*(options[n] for n in nodes))
        ]

    def _best_of(self, choices: list[list[tuple[int, int]]]) -> list[ReplicaLayout]:
        """Branch and bound: choices in order of a lower bound on their round time, each laid out by
        the DP until the bound exceeds the shortlist's margin over the best found. Ties (to the
        nanosecond, below float noise) go to fewer stages, then to the first listed."""
        for reserve in (self.engine.max_num_seqs, 1):  # KV room for a full batch; else for one request
            terms = [self._stage_terms(stages, reserve * self.max_total_len) for stages in choices]
            order = sorted(range(len(choices)), key=lambda i: terms[i].lower_bound)
            found: dict[ReplicaLayout, tuple] = {}
            for i in order:
                if found and terms[i].lower_bound > min(found.values())[0] * (1 + SHORTLIST_MARGIN) + 1e-9:
                    break
                layout = self._layout(choices[i], terms[i])
                if layout is not None and layout not in found:
                    found[layout] = (round(layout.round_seconds, 9), len(layout.stages), i)
            if found:
                ranked = sorted(found, key=found.get)
                limit = ranked[0].round_seconds * (1 + SHORTLIST_MARGIN) + 1e-9
                return [layout for layout in ranked if layout.round_seconds <= limit][:SHORTLIST_SIZE]
        return []

    def _symmetric_choices(self, nodes: list[int], counts: dict[int, int]) -> list[list[tuple[int, int]]]:
        """Every stage with the same TP degree (and, in _layout, the same layer count)."""
        choices = []
        for tp in self.model.valid_tp_degrees():
            if all(counts[n] % tp == 0 for n in nodes):
                choices.append([(n, tp) for n in nodes for _ in range(counts[n] // tp)])
        return choices

    def _tp_splits(self, count: int) -> list[tuple[int, ...]]:
        """Ways to split a node's devices into TP groups: k groups of one degree t (largest t first),
        the remainder split greedily into the largest valid degrees."""
        degrees = sorted(self.model.valid_tp_degrees(), reverse=True)
        splits = []
        for tp in degrees:
            if tp > count:
                continue
            split, rest = [tp] * (count // tp), count % tp
            for d in degrees:
                while rest >= d:
                    split.append(d)
                    rest -= d
            if tuple(split) not in splits:
                splits.append(tuple(split))
        return splits

    def _ordered_nodes(self, nodes: list[int]) -> list[int]:
        """Nodes grouped by site, sites chained to minimise the latency of consecutive crossings."""
        by_site: dict[str, list[int]] = {}
        for n in sorted(nodes):
            by_site.setdefault(self.cluster.nodes[n].site, []).append(n)
        sites = list(by_site)

        def chain_cost(order) -> float:
            return sum(self.cluster.link(by_site[a][0], by_site[b][0]).latency_ms for a, b in zip(order, order[1:]))

        if len(sites) <= 6:
            sites = list(min(itertools.permutations(sites), key=chain_cost))
        return [n for site in sites for n in by_site[site]]

    def _stage_terms(self, stages: list[tuple[int, int]], reserve_tokens: int) -> "_StageTerms":
        """Per stage: reference step time per layer and fixed (mean over the engine's mix of steps, see
        ReferenceStep.mixture), layer cap; the links; a lower bound."""
        num_stages = len(stages)
        num_micro_batches = self.engine.num_micro_batches or num_stages
        steps = ReferenceStep.mixture(self.engine.max_num_seqs / num_micro_batches, self.prompt_len,
                                      self.output_len, self.engine.max_num_batched_tokens)
        per_layer, fixed, caps = np.zeros((len(steps), num_stages)), np.zeros((len(steps), num_stages)), []
        sends = np.zeros((len(steps), num_stages - 1))
        for j, (node, tp) in enumerate(stages):
            cost = StageCost(self.model, self.cluster.nodes[node].device, tp, self.cluster.intra_node, j == 0, j == num_stages - 1)
            for k, (_, step) in enumerate(steps):
                per_layer[k, j] = cost.layer_time(step.num_tokens, step.attended_pairs, step.kv_read_tokens)
                fixed[k, j] = cost.fixed_time(step.num_sampled)
                if j + 1 < num_stages:
                    link = self.cluster.link(node, stages[j + 1][0])
                    sends[k, j] = activation_send_time(self.model, step.num_tokens, link)
            caps.append(self._max_layers(cost, reserve_tokens))
        weights = np.array([w for w, _ in steps])
        mean_per_layer, mean_fixed = weights @ per_layer, weights @ fixed
        return_time = self.cluster.link(stages[-1][0], stages[0][0]).latency_s if num_stages > 1 else 0.0
        # relaxing layer counts to reals >= -inf, the best bottleneck T levels every stage:
        # sum_j (T - fixed_j) / per_layer_j = L; and a round takes at least S * T
        inverse = sum(1 / a for a in mean_per_layer)
        level = (self.model.num_layers + sum(b / a for a, b in zip(mean_per_layer, mean_fixed))) / inverse
        return _StageTerms(mean_per_layer, mean_fixed, np.array(caps), weights, per_layer, fixed, sends,
                           return_time, num_micro_batches, num_stages * level)

    def _layout(self, stages: list[tuple[int, int]], terms: "_StageTerms") -> ReplicaLayout | None:
        num_stages, num_layers = len(stages), self.model.num_layers
        if num_stages > num_layers:
            return None
        if self.is_symmetric:
            if num_layers % num_stages or min(terms.caps) < num_layers // num_stages:
                return None
            layers = [num_layers // num_stages] * num_stages
        else:
            layers = allocate_layers(terms.per_layer, terms.fixed, terms.caps, num_layers)
            if layers is None:
                return None
        times = terms.step_per_layer * np.array(layers) + terms.step_fixed  # per step kind, per stage
        total = mixture_round_time(list(terms.weights), times.tolist(), terms.step_sends.tolist(),
                                   terms.return_time, terms.num_micro_batches)
        return ReplicaLayout(tuple(StageLayout(n, t, l) for (n, t), l in zip(stages, layers)), float(total))

    def _max_layers(self, cost: StageCost, reserve_tokens: int) -> int:
        """Most layers the stage holds with KV room for `reserve_tokens` tokens (memory is linear in layers)."""
        m, e, tp = self.model, self.engine, cost.tp
        free = (
            cost.device.memory_bytes * USABLE_MEMORY_FRACTION
            - weight_bytes_per_device(m, tp, 0, cost.is_first, cost.is_last)
            - workspace_bytes_per_device(m, tp, e.max_num_batched_tokens, e.max_num_seqs, cost.is_last)
        )
        per_layer = m.layer_bytes / tp + kv_bytes_per_token_per_device(m, tp, 1) * reserve_tokens
        return max(0, int(free // per_layer))


@dataclass(frozen=True)
class _StageTerms:
    per_layer: np.ndarray  # per stage: seconds per layer of the mean micro-batch step
    fixed: np.ndarray  # per stage: seconds per step independent of layers
    caps: np.ndarray  # most layers each stage holds
    weights: np.ndarray  # per step kind of the mixture: its probability
    step_per_layer: np.ndarray  # per step kind, per stage
    step_fixed: np.ndarray  # per step kind, per stage
    step_sends: np.ndarray  # per step kind, per link between consecutive stages
    return_time: float
    num_micro_batches: int
    lower_bound: float  # on the round time of any layer allocation


@lru_cache(maxsize=8)
def _shift_index(num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(num_layers + 1)
    prev = x[:, None] - x[None, :]  # prev[x, l] = x - l: layers on the earlier stages
    return prev, prev >= 0


def allocate_layers(per_layer: np.ndarray, fixed: np.ndarray, caps: np.ndarray, num_layers: int) -> list[int] | None:
    """Min-max DP: best[j][x] = min over l of max(best[j-1][x-l], l*per_layer[j] + fixed[j]), with
    1 <= l <= caps[j]; returns the layer counts reaching x = num_layers, or None when they cannot fit."""
    prev_index, valid = _shift_index(num_layers)
    l = np.arange(num_layers + 1)
    best = np.full(num_layers + 1, np.inf)
    best[0] = 0.0
    picks = []
    for a, b, cap in zip(per_layer, fixed, caps):
        stage_cost = np.where((l >= 1) & (l <= cap), l * a + b, np.inf)
        candidates = np.maximum(np.where(valid, best[np.clip(prev_index, 0, None)], np.inf), stage_cost[None, :])
        pick = candidates.argmin(axis=1)
        best = candidates[np.arange(num_layers + 1), pick]
        picks.append(pick)
    if not np.isfinite(best[num_layers]):
        return None
    layers, x = [], num_layers
    for pick in reversed(picks):
        layers.append(int(pick[x]))
        x -= layers[-1]
    return layers[::-1]
