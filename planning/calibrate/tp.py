"""The all-reduce latency a tensor-parallel stage of the engine pays per call, fitted to its own steps.

planning/calibrate_links times back-to-back all-reduces between otherwise idle processes. Inside a
TP stage the ranks compute between calls, and with more workers than cores (3 on a 2-core machine)
a call also waits for a peer that is off its core. So a short trace is served by a real engine of
one stage of `tp` single-thread workers, and each step's measured compute time, less the cost
model's time for that step with a zero all-reduce latency (the calibrated device, shared among the
workers as planning/fidelity.shared_device describes), is spread over the step's 2 * layers
all-reduces. The median over the steps is the latency the device file carries for `tp`.

The figure is of this machine as the engine uses it: with more workers than cores it includes the
waits for peers that are off their core, so a plan for the same workers without oversubscription
would over-count it. The fit runs the same deployment as the fidelity check's TP3 row, on a
different trace, so that row is partly in-sample; TP3:20+TP1:10 is not.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from hexcore.config import DeploymentConfig
from planning.inputs.catalog import DeviceFile
from planning.fidelity.check import engine_config, predicted_costs, replica, step_seconds
from planning.fidelity.replay import MeasuredStep, run_trace
from planning.inputs.workload import Request

# Prefill of mixed lengths, then decode at batch 8, then 4 (the shorter requests finish): ~25 steps.
TRACE = [Request(0.0, 64, 16)] * 4 + [Request(0.0, 16, 24)] * 4


@dataclass(frozen=True)
class TPGroupFit:
    tp: int
    num_layers: int
    allreduce_latency_s: float  # the median over the steps
    num_steps: int
    spread_s: tuple[float, float]  # the steps' 10th and 90th percentiles


def fit_tp_allreduce_latency(device_file: DeviceFile, tp: int, num_layers: int, dtype: str) -> TPGroupFit:
    """Serve TRACE on [TP `tp`: `num_layers`] and fit the per-call all-reduce latency to its steps."""
    config = engine_config([replica((tp, num_layers))], dtype)
    measurement = run_trace(config, TRACE)
    per_call = latency_per_call(device_file, config, measurement.steps)
    if not per_call:
        raise RuntimeError(f"the TP {tp} engine reported no step times")
    deciles = statistics.quantiles(per_call, n=10) if len(per_call) > 1 else per_call * 9
    return TPGroupFit(tp, num_layers, max(0.0, statistics.median(per_call)), len(per_call), (deciles[0], deciles[-1]))


def latency_per_call(device_file: DeviceFile, config: DeploymentConfig, steps: list[MeasuredStep]) -> list[float]:
    """Per step of a one-stage TP replica: (measured - modelled without all-reduce latency) / (2 * layers)."""
    (stage,) = config.replicas[0].stages
    by_tp = dict(device_file.link.allreduce_latency_ms_by_tp or {}) | {stage.tp: 0.0}
    no_latency = device_file.model_copy(update={
        "link": device_file.link.model_copy(update={"allreduce_latency_ms": 0.0, "allreduce_latency_ms_by_tp": by_tp})})
    (cost,) = predicted_costs(config, no_latency)
    return [(sum(step.stage_seconds.values()) - step_seconds(cost, step.shape)) / (2 * stage.layers) for step in steps]
