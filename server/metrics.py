"""Prometheus metrics: per-request figures observed by the HTTP layer, engine state read at scrape time."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hexcore.engine.client import EngineClient
from hexcore.outputs import RequestOutput

logger = logging.getLogger("hexgen.server")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
UNKNOWN_REPLICA = "unknown"
# why a request was refused before any work (hexgen_requests_rejected_total{reason}); see APIError.rejection_reason
REJECTION_REASONS = ("invalid_request", "unauthorized", "too_large", "overloaded", "not_ready", "unavailable")


class _EngineStatsCollector:
    """Reads `engine.stats()` on every scrape, so gauges are never stale."""

    def __init__(self, engine: EngineClient):
        self._engine = engine

    def collect(self):
        running = GaugeMetricFamily("hexgen_num_requests_running", "Requests being decoded", labels=["replica"])
        waiting = GaugeMetricFamily("hexgen_num_requests_waiting", "Requests queued for admission", labels=["replica"])
        kv_usage = GaugeMetricFamily("hexgen_kv_cache_usage_ratio", "Share of KV cache blocks in use", labels=["replica"])
        busy = GaugeMetricFamily(
            "hexgen_stage_busy_ratio", "Busy time / wall time of each pipeline stage", labels=["replica", "stage"]
        )
        preemptions = CounterMetricFamily("hexgen_num_preemptions", "Requests preempted", labels=["replica"])
        up = GaugeMetricFamily("hexgen_replica_up", "1 while the replica serves, 0 while it is down", labels=["replica"])
        restarts = CounterMetricFamily("hexgen_replica_restarts", "Restarts after a failure", labels=["replica"])
        resumed = CounterMetricFamily("hexgen_requests_resumed", "Requests moved to other replicas after the replica "
                                      "failed", labels=["replica"])
        if self._engine.is_ready:
            try:
                replicas = self._engine.stats().replicas
            except Exception:  # a scrape must never fail because of the engine
                logger.exception("engine stats unavailable")
                replicas = []
            for replica in replicas:
                running.add_metric([replica.name], replica.num_running)
                waiting.add_metric([replica.name], replica.num_waiting)
                kv_usage.add_metric([replica.name], replica.num_kv_blocks_used / max(replica.num_kv_blocks_total, 1))
                preemptions.add_metric([replica.name], replica.num_preemptions)
                up.add_metric([replica.name], 1.0 if replica.is_up else 0.0)
                restarts.add_metric([replica.name], replica.num_restarts)
                resumed.add_metric([replica.name], replica.num_resumed)
                for stage, fraction in enumerate(replica.stage_busy_fraction):
                    busy.add_metric([replica.name, str(stage)], fraction)
        yield from (running, waiting, kv_usage, busy, preemptions, up, restarts, resumed)


class ServerMetrics:
    def __init__(self, engine: EngineClient):
        self.registry = CollectorRegistry()
        self.finished_choices = Counter(
            "hexgen_request_success", "Finished choices (n>1 requests count n times) by finish reason",
            ["replica", "finish_reason"], registry=self.registry,
        )
        self.rejected_requests = Counter(
            "hexgen_requests_rejected", "HTTP requests refused before any work, by reason: " + ", ".join(REJECTION_REASONS),
            ["reason"], registry=self.registry,
        )
        for reason in REJECTION_REASONS:  # every reason shows from the start, at 0
            self.rejected_requests.labels(reason)
        self.prompt_tokens = Counter("hexgen_prompt_tokens", "Prompt tokens processed", ["replica"], registry=self.registry)
        self.generation_tokens = Counter(
            "hexgen_generation_tokens", "Tokens generated", ["replica"], registry=self.registry
        )
        self.ttft = Histogram(
            "hexgen_time_to_first_token_seconds", "Arrival to first generated token", ["replica"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.tpot = Histogram(
            "hexgen_time_per_output_token_seconds", "(E2E - TTFT) / (output tokens - 1)", ["replica"],
            buckets=_TOKEN_GAP_BUCKETS, registry=self.registry,
        )
        self.e2e = Histogram(
            "hexgen_e2e_request_latency_seconds", "Arrival to last token", ["replica"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(_EngineStatsCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def count_rejection(self, reason: str) -> None:
        self.rejected_requests.labels(reason).inc()


class RequestTracker:
    """Token counts and timings of one engine request; reports them to the metrics once it ends."""

    def __init__(self, metrics: ServerMetrics, arrival_time: float):
        self._metrics = metrics
        self._arrival_time = arrival_time
        self._first_token_time: float | None = None
        self.replica = UNKNOWN_REPLICA
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0  # of the prompt, found in the prefix cache
        self.num_tokens_by_choice: dict[int, int] = {}
        self.finish_reasons: dict[int, str] = {}
        self.is_rejected = False  # the engine refused it: counted as a rejection, not as a finish
        self._is_reported = False

    @property
    def num_completion_tokens(self) -> int:
        return sum(self.num_tokens_by_choice.values())

    def observe(self, output: RequestOutput) -> None:
        self.replica = output.replica or self.replica
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, output.num_cached_tokens)
        for delta in output.choices:
            if delta.token_ids and self._first_token_time is None:
                self._first_token_time = time.monotonic()
            self.num_tokens_by_choice[delta.index] = self.num_tokens_by_choice.get(delta.index, 0) + len(delta.token_ids)
            if delta.finish_reason is not None:
                self.finish_reasons[delta.index] = delta.finish_reason

    def report(self, num_choices: int) -> None:
        """Once, when the request ended (finished or not): unfinished choices count as aborted. A
        request the engine refused is no finish (the HTTP layer counts it as a rejection)."""
        if self._is_reported or self.is_rejected:
            return
        self._is_reported = True
        metrics, replica = self._metrics, self.replica
        for index in range(num_choices):
            metrics.finished_choices.labels(replica, self.finish_reasons.get(index, "abort")).inc()
        metrics.prompt_tokens.labels(replica).inc(self.num_prompt_tokens)
        metrics.generation_tokens.labels(replica).inc(self.num_completion_tokens)
        if self._first_token_time is None or len(self.finish_reasons) < num_choices:
            return  # latencies only for requests that ran to the end
        e2e = time.monotonic() - self._arrival_time
        ttft = self._first_token_time - self._arrival_time
        metrics.ttft.labels(replica).observe(ttft)
        metrics.e2e.labels(replica).observe(e2e)
        num_output_tokens = max(self.num_tokens_by_choice.values())
        if num_output_tokens > 1:
            metrics.tpot.labels(replica).observe((e2e - ttft) / (num_output_tokens - 1))
