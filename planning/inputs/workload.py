"""The workload file and the request trace the simulator replays.

```yaml
rate: 2.0              # requests per second, Poisson arrivals
prompt_len: 128        # fixed lengths, or instead `trace:` of [prompt_len, output_len] pairs
output_len: 64
slo_seconds: 20        # end-to-end deadline per request
num_requests: 200      # optional: length of the simulated trace (default 200)
seed: 0                # optional: seed of the arrival times
```
A trace is replayed in order, cycling when `num_requests` exceeds its length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hexcore.config import load_yaml_spec



class WorkloadSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rate: float = Field(gt=0)
    prompt_len: int | None = Field(default=None, ge=1)
    output_len: int | None = Field(default=None, ge=1)
    trace: list[tuple[int, int]] | None = Field(default=None, min_length=1)
    slo_seconds: float = Field(gt=0)
    num_requests: int = Field(default=200, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _lengths(self) -> "WorkloadSpec":
        has_fixed = self.prompt_len is not None and self.output_len is not None
        if has_fixed == (self.trace is not None):
            raise ValueError("give either prompt_len and output_len, or trace (not both)")
        if self.trace is not None and any(p < 1 or o < 1 for p, o in self.trace):
            raise ValueError("trace lengths must be >= 1")
        return self

    @property
    def length_pairs(self) -> list[tuple[int, int]]:
        return list(self.trace) if self.trace is not None else [(self.prompt_len, self.output_len)]

    @property
    def mean_prompt_len(self) -> float:
        return float(np.mean([p for p, _ in self.length_pairs]))

    @property
    def mean_output_len(self) -> float:
        return float(np.mean([o for _, o in self.length_pairs]))

    @property
    def max_total_len(self) -> int:
        return max(p + o for p, o in self.length_pairs)


@dataclass(frozen=True)
class Request:
    arrival: float
    prompt_len: int
    output_len: int


def make_requests(workload: WorkloadSpec) -> list[Request]:
    """Poisson arrivals at `rate` (seeded), lengths from the fixed pair or the trace in order."""
    rng = np.random.default_rng(workload.seed)
    arrivals = np.cumsum(rng.exponential(1.0 / workload.rate, size=workload.num_requests))
    pairs = workload.length_pairs
    return [Request(float(t), *pairs[i % len(pairs)]) for i, t in enumerate(arrivals)]


def load_workload(path: str | Path) -> WorkloadSpec:
    return load_yaml_spec(path, WorkloadSpec, "workload file")
