"""Serving-benchmark metrics from per-request timestamps, with the definitions vLLM's serving benchmark uses.

All times are seconds, measured from the moment the request was sent:
- TTFT: time to the first chunk carrying generated text.
- ITL: every gap between consecutive text-carrying chunks (one list over all requests).
- E2E latency: time to the last chunk carrying a choice.
- TPOT: (E2E - TTFT) / (output tokens - 1), only for requests with more than one output token;
  a request with one output token counts as TPOT 0 against the SLO.
- Throughputs divide totals over successful requests by the benchmark's wall time.
- Goodput: successful requests per second whose TTFT and TPOT both meet the given SLOs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestRecord:
    """What one benchmark request observed."""

    is_success: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itls: tuple[float, ...] = ()
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float:
        """Time per output token after the first; 0 when there is at most one output token."""
        if self.num_output_tokens <= 1:
            return 0.0
        return (self.e2e - self.ttft) / (self.num_output_tokens - 1)


@dataclass(frozen=True)
class LatencyStats:
    """Mean and percentiles of one latency, in milliseconds."""

    mean_ms: float
    median_ms: float
    p90_ms: float
    p99_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> "LatencyStats":
        """Linear-interpolation percentiles (numpy's default); all zeros for an empty list."""
        if not seconds:
            return cls(0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(seconds, dtype=float) * 1000.0
        median, p90, p99 = np.percentile(ms, PERCENTILES)
        return cls(float(ms.mean()), float(median), float(p90), float(p99))


@dataclass(frozen=True)
class Slo:
    """Per-request service-level objectives in milliseconds; None means not constrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @property
    def is_set(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def is_met(self, record: RequestRecord) -> bool:
        if not record.is_success:
            return False
        if self.ttft_ms is not None and record.ttft * 1000.0 > self.ttft_ms:
            return False
        return self.tpot_ms is None or record.tpot * 1000.0 <= self.tpot_ms


@dataclass(frozen=True)
class BenchmarkSummary:
    duration_s: float
    num_requests: int
    num_completed: int
    num_failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    goodput: float | None  # requests / s meeting every SLO; None without SLOs
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    slo: Slo = field(default_factory=Slo)


def summarize(records: list[RequestRecord], duration_s: float, slo: Slo = Slo()) -> BenchmarkSummary:
    """Aggregate per-request records of a run that took `duration_s` seconds of wall time."""
    if duration_s <= 0:
        raise ValueError(f"benchmark duration must be positive, got {duration_s}")
    done = [r for r in records if r.is_success]
    num_input = sum(r.num_prompt_tokens for r in done)
    num_output = sum(r.num_output_tokens for r in done)
    return BenchmarkSummary(
        duration_s=duration_s,
        num_requests=len(records),
        num_completed=len(done),
        num_failed=len(records) - len(done),
        total_input_tokens=num_input,
        total_output_tokens=num_output,
        request_throughput=len(done) / duration_s,
        output_throughput=num_output / duration_s,
        total_token_throughput=(num_input + num_output) / duration_s,
        goodput=sum(slo.is_met(r) for r in done) / duration_s if slo.is_set else None,
        ttft=LatencyStats.of([r.ttft for r in done]),
        tpot=LatencyStats.of([r.tpot for r in done if r.num_output_tokens > 1]),
        itl=LatencyStats.of([gap for r in done for gap in r.itls]),
        e2e=LatencyStats.of([r.e2e for r in done]),
        slo=slo,
    )


def record_from_timestamps(
    content_times: list[float],
    last_choice_time: float,
    num_output_tokens: int,
    num_prompt_tokens: int = 0,
) -> RequestRecord:
    """A successful record from the arrival times (relative to sending) of the text-carrying chunks."""
    if not content_times:
        return RequestRecord(is_success=False, error="the stream carried no generated text")
    gaps = tuple(b - a for a, b in zip(content_times, content_times[1:]))
    return RequestRecord(
        is_success=True,
        ttft=content_times[0],
        e2e=max(last_choice_time, content_times[-1]),
        itls=gaps,
        num_prompt_tokens=num_prompt_tokens,
        num_output_tokens=num_output_tokens,
    )
