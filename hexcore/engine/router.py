"""Sends each new request to the replica where it is expected to wait least.

Expected wait on replica r = (tokens of work queued on r + this request's tokens) / capacity of r,
where the work of a sequence is its uncomputed prompt plus its remaining output, and the capacity is
r's throughput: predicted by the planner when every replica has a prediction, else measured (tokens
processed per busy second) once every replica has run a few steps, else assumed equal. Only the
ratios between replicas matter. A slow replica still gets requests once the fast ones have enough queued, and
never more than it can drain as quickly as they can.
"""

from __future__ import annotations

from hexcore.engine.replica import Replica
from hexcore.engine.sequence import Sequence


def queued_tokens(replica: Replica) -> int:
    scheduler = replica.scheduler
    return sum(seq.num_uncomputed_tokens + seq.max_tokens - seq.num_generated
               for seq in list(scheduler.running) + list(scheduler.waiting))


def measured_capacity(replica: Replica) -> float | None:
    metrics = replica.metrics
    if metrics.num_steps < 8 or metrics.busy_seconds <= 0:
        return None
    return (metrics.num_prompt_tokens + metrics.num_generated_tokens) / metrics.busy_seconds


class Router:
    def __init__(self, replicas: list[Replica]):
        self.replicas = replicas

    def capacities(self, replicas: list[Replica]) -> dict[str, float]:
        predicted = {r.name: r.plan.spec.predicted_throughput_rps for r in replicas}
        if all(predicted.values()):
            return predicted
        measured = {r.name: measured_capacity(r) for r in replicas}
        if all(measured.values()):
            return measured
        return {r.name: 1.0 for r in replicas}

    def choose(self, seqs: list[Sequence]) -> Replica | None:
        """The replica, among those up whose KV cache can ever hold the request, with the least expected
        wait; None when no replica up can hold it."""
        need = max(seq.max_total_tokens() for seq in seqs)
        fitting = [r for r in self.replicas if r.is_up and r.block_manager.capacity_tokens >= need]
        if not fitting:
            return None
        work = sum(seq.max_total_tokens() for seq in seqs)
        capacities = self.capacities(fitting)
        return min(fitting, key=lambda r: (queued_tokens(r) + work) / capacities[r.name])
