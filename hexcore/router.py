"""Sends each new request to the replica where it is expected to wait least.

Expected wait on replica r = (tokens of work queued on r + this request's tokens) / capacity of r,
where the work of a sequence is its uncomputed prompt plus its remaining output, and the capacity is
r's token throughput: given by the planner, else measured (tokens processed per busy second),
else assumed equal. A slow replica still gets requests once the fast ones have enough queued, and
never more than it can drain as quickly as they can.
"""

from __future__ import annotations

from hexcore.replica import Replica
from hexcore.sequence import Sequence


def queued_tokens(replica: Replica) -> int:
    scheduler = replica.scheduler
    return sum(seq.num_uncomputed_tokens + seq.max_tokens - seq.num_generated
               for seq in list(scheduler.running) + list(scheduler.waiting))


def measured_capacity(replica: Replica) -> float | None:
    if replica.num_steps < 8 or replica.busy_seconds <= 0:
        return None
    return (replica.num_prompt_tokens + replica.num_generated_tokens) / replica.busy_seconds


class Router:
    def __init__(self, replicas: list[Replica], capacities: dict[str, float] | None = None):
        self.replicas = replicas
        self.given_capacities = capacities or {}

    def capacity(self, replica: Replica) -> float:
        return self.given_capacities.get(replica.name) or measured_capacity(replica) or 1.0

    def choose(self, seqs: list[Sequence]) -> Replica:
        """The replica, among those whose KV cache can ever hold the request, with the least expected wait."""
        need = max(seq.max_total_tokens() for seq in seqs)
        fitting = [r for r in self.replicas if r.block_manager.capacity_tokens >= need]
        assert fitting, "the engine rejects requests no replica can hold before routing them"
        work = sum(seq.max_total_tokens() for seq in seqs)
        return min(fitting, key=lambda r: (queued_tokens(r) + work) / self.capacity(r))
