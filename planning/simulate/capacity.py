"""How much load a replica and a plan carry, measured with the simulator (so that the figures agree with it).

- saturated_throughput_rps: a replica alone under a queue (arrivals at twice the cost model's
  estimate): requests finished per second from the first fifth of completions to the last one before
  the queue runs dry.
  It is what the replica delivers once requests wait, which is what decides whether a queue grows:
  hexcore's fill rule (planning.simulate.simulator) then puts every idle sequence in one micro-batch,
  so a pipelined replica runs below the cost model's evenly-filled estimate (ReplicaCost.throughput_rps).
  This figure is the replica's capacity for the router and the planner's `predicted_throughput_rps`.
- max_sustainable_rate: the highest Poisson rate a plan serves in steady state at the workload's
  deadline: at most its total saturated throughput (above it the queue grows without bound), and with
  at least TARGET_ATTAINMENT of the requests of SUSTAIN_WINDOW_S seconds of arrivals within the deadline.
"""

from __future__ import annotations

import math
from functools import lru_cache

from planning.cost.replica_cost import ReplicaCost
from planning.inputs.workload import Request, WorkloadSpec, make_requests
from planning.simulate.simulator import simulate, simulate_finish_times

NUM_SATURATION_REQUESTS = 300
TARGET_ATTAINMENT = 0.9
SUSTAIN_WINDOW_S = 30.0
NUM_BISECTIONS = 6


def saturated_throughput_rps(cost: ReplicaCost, workload: WorkloadSpec) -> float:
    """Requests per second the replica finishes while requests queue (0 when no request fits)."""
    return _saturated(cost, tuple(workload.length_pairs))


@lru_cache(maxsize=4096)
def _saturated(cost: ReplicaCost, length_pairs: tuple[tuple[int, int], ...]) -> float:
    prompt = sum(p for p, _ in length_pairs) / len(length_pairs)
    output = sum(o for _, o in length_pairs) / len(length_pairs)
    estimate = cost.throughput_rps(prompt, output, max(p + o for p, o in length_pairs))
    if estimate <= 0:
        return 0.0
    # a queue forms within a few batches: 300 requests for the default 64 sequences, 100 for one at a time
    num_requests = min(NUM_SATURATION_REQUESTS, max(100, 5 * cost.engine.max_num_seqs))
    burst = WorkloadSpec(rate=2 * estimate, trace=list(length_pairs), slo_seconds=1.0, num_requests=num_requests)
    finish = sorted(simulate_finish_times(cost, burst, make_requests(burst)))
    # after the ramp-up, and while requests still wait (the last max_num_seqs are admitted to an empty queue)
    first, last = len(finish) // 5, len(finish) - cost.engine.max_num_seqs - 1
    if last <= first or finish[last] <= finish[first]:
        return estimate
    return (last - first) / (finish[last] - finish[first])


def unloaded_latency_s(cost: ReplicaCost, workload: WorkloadSpec) -> float:
    """End-to-end latency of the workload's longest request served alone on the replica."""
    prompt_len, output_len = max(workload.length_pairs, key=sum)
    alone = WorkloadSpec(rate=1.0, prompt_len=prompt_len, output_len=output_len, slo_seconds=1.0, num_requests=1)
    return simulate([cost], alone, [Request(0.0, prompt_len, output_len)], capacities=[1.0]).p50_latency_s


def max_sustainable_rate(costs: list[ReplicaCost], workload: WorkloadSpec, capacities: list[float]) -> float:
    """Highest rate (req/s) at or below the plan's saturated throughput with TARGET_ATTAINMENT of
    SUSTAIN_WINDOW_S seconds of arrivals within the workload's deadline (bisection, NUM_BISECTIONS steps)."""
    total = sum(capacities)
    if total <= 0:
        return 0.0

    def holds(rate: float) -> bool:
        window = workload.model_copy(update={"rate": rate, "num_requests": max(50, math.ceil(rate * SUSTAIN_WINDOW_S))})
        return simulate(costs, window, capacities=capacities).slo_attainment >= TARGET_ATTAINMENT

    if holds(total):
        return total
    low, high = 0.0, total
    for _ in range(NUM_BISECTIONS):
        middle = (low + high) / 2
        low, high = (middle, high) if holds(middle) else (low, middle)
    return low
