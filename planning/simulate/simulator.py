"""A discrete-event simulator of our serving engine, driven by the cost model.

What it models (the engine's behaviour as specified for hexcore):
- Poisson arrivals (planning.inputs.workload); a router sends each request to the replica with the least
  expected wait, (outstanding requests + 1) / predicted throughput, among replicas it fits in.
- Per replica, continuous batching: running sequences are spread over `num_micro_batches` slots
  (default: one per stage); whenever a slot's step comes back from the last stage its sequences advance
  and its next step is formed at once: one decode token per running sequence first, then prefill chunks
  of waiting or partly prefilled prompts, within the `max_num_batched_tokens` budget, admitting new
  requests while `max_num_seqs` (split over the slots) and the KV capacity allow.
- Pipelined stages: a step occupies stage j for its step time (cost_model.StageCost.step_time), crosses
  the link to stage j+1 (activation_send_time), and after the last stage the sampled tokens return to
  the first stage (one link latency). Stages serve steps first come, first served, so micro-batches of
  different slots overlap across stages.
Simplification: a request reserves KV for prompt + output tokens when admitted (the engine preempts
instead; the planner's capacity is the same either way).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from planning.cost.replica_cost import ReplicaCost
from planning.inputs.workload import Request, WorkloadSpec, make_requests


@dataclass(frozen=True)
class Predicted:
    slo_attainment: float
    throughput_rps: float
    p50_latency_s: float
    p99_latency_s: float
    mean_latency_s: float
    p50_ttft_s: float
    p99_ttft_s: float
    p50_tpot_s: float
    p99_tpot_s: float
    num_requests: int
    num_unservable: int  # requests no replica can hold

    def summary(self) -> dict:
        """The `predicted` object of `hexgen plan --json` and `hexgen simulate --json`."""
        def figure(value: float) -> float | None:  # no finished request: no latency (JSON null)
            return round(value, 4) if math.isfinite(value) else None

        return {
            "slo_attainment": figure(self.slo_attainment),
            "throughput_rps": figure(self.throughput_rps),
            "p50_latency_s": figure(self.p50_latency_s),
            "p99_latency_s": figure(self.p99_latency_s),
        }


@dataclass
class _Sequence:
    request: Request
    prefilled: int = 0
    generated: int = 0
    chunk: int = 0  # prompt tokens in the current step
    first_token_time: float = math.nan


@dataclass
class _ReplicaState:
    cost: ReplicaCost
    capacity_rps: float
    slots: list[list[_Sequence]]
    is_slot_busy: list[bool]
    stage_free_at: list[float]
    pipeline: list[tuple]  # per stage: step_time, layers, then latency and seconds per token to the next
    max_seqs_per_slot: int
    waiting: deque = field(default_factory=deque)
    kv_used: int = 0
    num_outstanding: int = 0


def simulate(replicas: list[ReplicaCost], workload: WorkloadSpec, requests: list[Request] | None = None) -> Predicted:
    """Replay the workload's requests (or `requests`) on the replicas and measure against the SLO."""
    requests = requests if requests is not None else make_requests(workload)
    return _Simulation(replicas, workload).run(requests, workload.slo_seconds)


def _pipeline(cost: ReplicaCost) -> list[tuple]:
    """Per stage: its step-time function, layers, and the transfer after it (the hidden states to the
    next stage; after the last stage, the sampled token ids back to the first: latency only)."""
    model = cost.stages[0].model
    token_bytes = model.hidden_size * model.dtype_bytes
    transfers = [(link.latency_s, token_bytes / link.bytes_per_second) for link in cost.send_links]
    transfers.append((cost.return_link.latency_s if cost.num_stages > 1 else 0.0, 0.0))
    return [(s.step_time, layers, *t) for s, layers, t in zip(cost.stages, cost.layers, transfers)]


class _Simulation:
    def __init__(self, replicas: list[ReplicaCost], workload: WorkloadSpec):
        p, o, longest = workload.mean_prompt_len, workload.mean_output_len, workload.max_total_len
        self.replicas = [
            _ReplicaState(
                cost=r,
                capacity_rps=r.throughput_rps(p, o, longest),
                slots=[[] for _ in range(r.num_micro_batches)],
                is_slot_busy=[False] * r.num_micro_batches,
                stage_free_at=[0.0] * r.num_stages,
                pipeline=_pipeline(r),
                max_seqs_per_slot=math.ceil(r.engine.max_num_seqs / r.num_micro_batches),
            )
            for r in replicas
        ]
        self.events: list[tuple[float, int, int, int]] = []  # (time, order, replica, slot); slot -1: arrival
        self.order = 0
        self.finished: list[tuple[Request, float, float]] = []  # request, first token time, finish time

    def run(self, requests: list[Request], slo_seconds: float) -> Predicted:
        for i, request in enumerate(requests):
            self._push(request.arrival, i, -1)
        while self.events:
            now, _, index, slot = heapq.heappop(self.events)
            if slot < 0:
                self._arrive(requests[index], now)
            else:
                self._step_done(self.replicas[index], index, slot, now)
        return self._predicted(requests, slo_seconds)

    def _push(self, time: float, index: int, slot: int) -> None:
        heapq.heappush(self.events, (time, self.order, index, slot))
        self.order += 1

    def _arrive(self, request: Request, now: float) -> None:
        need = request.prompt_len + request.output_len
        fits = [r for r in self.replicas if r.cost.kv_capacity_tokens >= need and r.capacity_rps > 0]
        if not fits:
            return  # unservable: counted as a miss
        replica = min(fits, key=lambda r: (r.num_outstanding + 1) / r.capacity_rps)
        replica.waiting.append(_Sequence(request))
        replica.num_outstanding += 1
        index = self.replicas.index(replica)
        for slot, is_busy in enumerate(replica.is_slot_busy):
            if not is_busy and replica.waiting:
                self._start_step(replica, index, slot, now)

    def _step_done(self, replica: _ReplicaState, index: int, slot: int, now: float) -> None:
        still_running = []
        for seq in replica.slots[slot]:
            if seq.prefilled < seq.request.prompt_len:
                seq.prefilled += seq.chunk
                if seq.chunk and seq.prefilled == seq.request.prompt_len:
                    seq.generated, seq.first_token_time = 1, now
            else:
                seq.generated += 1
            seq.chunk = 0
            if seq.generated >= seq.request.output_len:
                self.finished.append((seq.request, seq.first_token_time, now))
                replica.kv_used -= seq.request.prompt_len + seq.request.output_len
                replica.num_outstanding -= 1
            else:
                still_running.append(seq)
        replica.slots[slot] = still_running
        replica.is_slot_busy[slot] = False
        self._start_step(replica, index, slot, now)

    def _start_step(self, replica: _ReplicaState, index: int, slot: int, now: float) -> None:
        """Form the slot's next step and book it through the pipeline; leave the slot idle if empty."""
        cost, engine = replica.cost, replica.cost.engine
        seqs = replica.slots[slot]
        max_seqs = replica.max_seqs_per_slot
        budget = engine.max_num_batched_tokens
        tokens = pairs = kv_read = sampled = 0
        for seq in seqs:  # decodes first
            if seq.prefilled == seq.request.prompt_len and budget > 0:
                context = seq.request.prompt_len + seq.generated
                tokens, pairs, kv_read, sampled, budget = tokens + 1, pairs + context, kv_read + context, sampled + 1, budget - 1
        pending_prefill = sum(s.request.prompt_len - s.prefilled for s in seqs)
        while replica.waiting and len(seqs) < max_seqs and budget > pending_prefill:
            need = replica.waiting[0].request.prompt_len + replica.waiting[0].request.output_len
            if replica.kv_used + need > cost.kv_capacity_tokens:
                break
            replica.kv_used += need
            seqs.append(replica.waiting.popleft())
            pending_prefill += seqs[-1].request.prompt_len
        for seq in seqs:  # then prefill chunks
            remaining = seq.request.prompt_len - seq.prefilled
            if remaining > 0 and budget > 0:
                chunk = min(remaining, budget)
                seq.chunk, budget = chunk, budget - chunk
                tokens += chunk
                pairs += chunk * seq.prefilled + chunk * (chunk + 1) // 2
                kv_read += seq.prefilled + chunk
                sampled += int(chunk == remaining)
        if tokens == 0:
            return
        time, free_at = now, replica.stage_free_at
        for j, (step_time, layers, send_latency, send_seconds_per_token) in enumerate(replica.pipeline):
            time = (time if time > free_at[j] else free_at[j]) + step_time(layers, tokens, pairs, kv_read, sampled)
            free_at[j] = time
            time += send_latency + tokens * send_seconds_per_token
        replica.is_slot_busy[slot] = True
        self._push(time, index, slot)

    def _predicted(self, requests: list[Request], slo_seconds: float) -> Predicted:
        num = len(requests)
        if not self.finished:
            return Predicted(0.0, 0.0, *([math.inf] * 7), num, num)
        arrival = np.array([r.arrival for r, _, _ in self.finished])
        first = np.array([f for _, f, _ in self.finished])
        finish = np.array([t for _, _, t in self.finished])
        outputs = np.array([r.output_len for r, _, _ in self.finished])
        e2e, ttft = finish - arrival, first - arrival
        multi = outputs > 1
        tpot = (finish - first)[multi] / (outputs[multi] - 1) if multi.any() else np.zeros(1)
        span = finish.max() - min(r.arrival for r in requests)
        return Predicted(
            slo_attainment=float(np.sum(e2e <= slo_seconds)) / num,
            throughput_rps=float(len(self.finished) / span) if span > 0 else 0.0,
            p50_latency_s=float(np.percentile(e2e, 50)),
            p99_latency_s=float(np.percentile(e2e, 99)),
            mean_latency_s=float(e2e.mean()),
            p50_ttft_s=float(np.percentile(ttft, 50)),
            p99_ttft_s=float(np.percentile(ttft, 99)),
            p50_tpot_s=float(np.percentile(tpot, 50)),
            p99_tpot_s=float(np.percentile(tpot, 99)),
            num_requests=num,
            num_unservable=num - len(self.finished),
        )
