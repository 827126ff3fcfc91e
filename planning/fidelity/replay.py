"""The measured half of the fidelity check: replay a request trace on the real engine.

Requests are added at their arrival times (to within one engine step), with random prompt token ids
and `ignore_eos`, so every request has exactly the trace's lengths. Recorded: per request its first
token and finish times; per engine step its composition (new tokens and context of each sequence,
sampled or not) and each worker's compute interval (the workers' `recent_steps`, polled by the engine
every second).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

from hexcore.config import DeploymentConfig
from hexcore.sampling_params import SamplingParams
from planning.inputs.workload import Request


@dataclass(frozen=True)
class StepTokens:
    """What one engine step computed: per sequence its new tokens, its context after the step
    (cached + new) and whether a token was sampled."""

    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    num_sampled: int

    @property
    def is_prefill(self) -> bool:
        return max(self.query_lens) > 1


@dataclass(frozen=True)
class MeasuredStep:
    replica: str
    shape: StepTokens
    stage_seconds: dict[int, float]  # stage -> the slowest rank's compute time


@dataclass(frozen=True)
class RequestTimes:
    """Seconds since the trace started (the trace's own clock)."""

    arrival: float
    first_token: float
    finish: float
    num_output_tokens: int


@dataclass(frozen=True)
class Measurement:
    requests: list[RequestTimes]
    steps: list[MeasuredStep]  # steps whose every stage reported its compute time
    load_average: float  # 1-minute load average at the end of the run


def run_trace(config: DeploymentConfig, requests: list[Request], seed: int = 0) -> Measurement:
    """Serve `requests` on a fresh engine of `config` (needs a `__main__` guard: workers fork-serve)."""
    from hexcore.engine.llm import LLM

    rng = random.Random(seed)
    with LLM(config) as llm:
        core = llm.core
        vocab = core.deployment.dims.vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(r.prompt_len)] for r in requests]
        # warm-up: one short request per replica (the router spreads requests added together), so no
        # replica's first measured step pays for its worker's first-call costs (figures: BENCHMARKS.md, Layouts)
        llm.generate([prompts[0][:8]] * len(core.replicas), SamplingParams(max_tokens=2, ignore_eos=True))
        cold = [r.name for r in core.replicas if r.metrics.num_steps == 0]
        if cold:  # replicas of very unequal capacity: the router sent every warm-up elsewhere
            raise RuntimeError(f"the warm-up did not reach replicas {cold}; their first steps would be measured cold")
        shapes: dict[tuple[str, int], StepTokens] = {}
        for replica in core.replicas:
            _record_submits(replica, shapes)
        intervals = _WorkerIntervals()
        first_token: dict[int, float] = {}
        finish: dict[int, float] = {}
        num_tokens = [0] * len(requests)
        start = time.monotonic()
        next_request = 0
        while next_request < len(requests) or core.has_unfinished:
            now = time.monotonic() - start
            while next_request < len(requests) and requests[next_request].arrival <= now:
                r = requests[next_request]
                params = SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0)
                core.add_request(f"fidelity-{next_request}", prompts[next_request], params)
                next_request += 1
            until_next = requests[next_request].arrival - now if next_request < len(requests) else 1.0
            if not core.has_unfinished:
                time.sleep(max(0.0, until_next))
                continue
            outputs = core.step(timeout=max(0.0, min(until_next, 1.0)))
            now = time.monotonic() - start
            intervals.update(core)
            for output in outputs:
                index = int(output.request_id.rsplit("-", 1)[1])
                num_tokens[index] += sum(len(c.token_ids) for c in output.choices)
                if num_tokens[index] and index not in first_token:
                    first_token[index] = now
                if output.is_finished:
                    finish[index] = now
        core.collect_worker_stats()
        intervals.update(core)
        steps = intervals.join(core, shapes)
    times = [RequestTimes(r.arrival, first_token[i], finish[i], num_tokens[i]) for i, r in enumerate(requests)]
    return Measurement(times, steps, os.getloadavg()[0])


def _record_submits(replica, shapes: dict[tuple[str, int], StepTokens]) -> None:
    """Keep every step's composition by step id, as the replica submits it."""

    def record(batch) -> None:
        num_sampled = sum(spec is not None for spec in batch.sampling)
        shapes[(replica.name, batch.step_id)] = StepTokens(tuple(batch.query_lens), tuple(batch.context_lens),
                                                          num_sampled)

    replica.step_observers.append(record)


class _WorkerIntervals:
    """Every worker's compute interval per step id, gathered from the stats snapshots the engine
    polls once a second (each holds a worker's last 256 steps: with steps longer than 4 ms none is
    missed; a step some stage did not report is left out, not guessed)."""

    def __init__(self):
        self.seconds: dict[tuple[str, int], dict[int, float]] = {}  # (replica, step id) -> rank -> seconds
        self._seen: dict[tuple[str, int], object] = {}

    def update(self, core) -> None:
        for replica in core.replicas:
            for rank, stats in replica.workers.stats.items():
                if self._seen.get((replica.name, rank)) is stats:
                    continue
                self._seen[(replica.name, rank)] = stats
                for step_id, started, ended in stats.recent_steps:
                    self.seconds.setdefault((replica.name, step_id), {})[rank] = ended - started

    def join(self, core, shapes: dict[tuple[str, int], StepTokens]) -> list[MeasuredStep]:
        """Steps with their shape and, per stage, the slowest rank's compute time."""
        steps = []
        for replica in core.replicas:
            stages = replica.plan.workers[0].stages
            for (name, step_id), shape in shapes.items():
                by_rank = self.seconds.get((name, step_id), {})
                if name != replica.name or any(rank not in by_rank for s in stages for rank in s.ranks):
                    continue
                steps.append(MeasuredStep(name, shape, {j: max(by_rank[rank] for rank in s.ranks)
                                                  for j, s in enumerate(stages)}))
        return steps
