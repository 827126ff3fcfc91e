"""The fidelity check's arithmetic (no engine runs): step costs, figures, ratios, the table; the
calibration fit of the engine-stage overheads; the cpu cost model and per-TP all-reduce latency."""

import math

import pytest

from hexcore.config import check_against_model
from planning.calibrate.engine import StageTiming, StepShape as CalibrationShape, faster_than_memory, fit_overheads
from planning.cost.stage_cost import StageCost, allreduce_time
from planning.inputs.catalog import DeviceFile, DeviceSpec, LinkSpec
from planning.fidelity.check import (DEPLOYMENTS, METRICS, Figures, Row, as_planned, deployment_config, markdown_table,
                               shared_device, predicted_costs, rows_of, step_seconds, summary)
from planning.calibrate.tp import latency_per_call
from planning.fidelity.replay import MeasuredStep, StepTokens
from planning.inputs.models import load_model
from planning.simulate.simulator import simulate
from planning.inputs.workload import Request, WorkloadSpec

LINK = LinkSpec(bandwidth_gbps=30, latency_ms=1.0, allreduce_latency_ms=0.6, allreduce_latency_ms_by_tp={3: 3.0})
DEVICE = DeviceFile(memory_gb=12, tflops=0.07, mem_bandwidth_gbs=18, kind="cpu", overhead_ms_per_layer=0.8,
                    overhead_ms_per_step=2.0, overhead_us_per_kv_token=1.0, link=LINK)
SMOLLM = load_model("smollm2-135m").with_dtype("float32")


def test_every_deployment_fits_smollm2_and_tp2_cannot():
    for name in DEPLOYMENTS:
        check_against_model(deployment_config(name), 30, 9, 3)
        assert len(predicted_costs(deployment_config(name), DEVICE)) == len(DEPLOYMENTS[name])
    tp2 = deployment_config("TP1").model_copy(update={"replicas": [DEPLOYMENTS["TP3"][0].model_copy(
        update={"stages": [DEPLOYMENTS["TP3"][0].stages[0].model_copy(update={"devices": ["cpu", "cpu"]})]})]})
    with pytest.raises(ValueError, match="TP degree 2 does not divide the model's 9 attention heads"):
        check_against_model(tp2, 30, 9, 3)
    with pytest.raises(ValueError, match="unknown deployment 'TP2'"):
        deployment_config("TP2")


def test_step_cost_of_an_engine_step_matches_the_cost_model_helpers():
    (tp1,) = predicted_costs(deployment_config("TP1"), DEVICE)
    stage = tp1.stages[0]
    prefill = StepTokens(query_lens=(64,), context_lens=(64,), num_sampled=1)
    decode = StepTokens(query_lens=(1, 1, 1), context_lens=(81, 81, 81), num_sampled=3)
    assert prefill.is_prefill and not decode.is_prefill
    assert step_seconds(tp1, prefill) == pytest.approx(stage.prefill_time(30, 64))
    assert step_seconds(tp1, decode) == pytest.approx(stage.decode_time(30, 3, 80))
    (pp,) = predicted_costs(deployment_config("TP1+TP1"), DEVICE)  # two stages of 15: the head once, two step overheads
    assert step_seconds(pp, decode) == pytest.approx(pp.stages[0].decode_time(15, 3, 80) + pp.stages[1].decode_time(15, 3, 80))
    assert step_seconds(pp, decode) > step_seconds(tp1, decode)


def test_simulated_single_request_is_the_cost_models_prefill_then_decodes():
    (tp1,) = predicted_costs(deployment_config("TP1"), DEVICE)
    stage = tp1.stages[0]
    workload = WorkloadSpec(rate=1, prompt_len=64, output_len=4, slo_seconds=100, num_requests=1)
    predicted = simulate([tp1], workload, [Request(0.0, 64, 4)])
    assert predicted.p50_ttft_s == pytest.approx(stage.prefill_time(30, 64))
    decodes = [stage.decode_time(30, 1, 64 + g) for g in range(3)]
    assert predicted.p50_tpot_s == pytest.approx(sum(decodes) / 3)


def test_serving_figures_from_synthetic_timestamps():
    figures = Figures.serving(arrival=[0.0, 1.0, 2.0], first_token=[0.5, 1.5, 3.0], finish=[1.5, 2.5, 5.0],
                              num_outputs=[11, 11, 1], prefill_s=0.2, decode_s=0.05).values
    assert list(figures) == list(METRICS)
    assert figures["throughput req/s"] == pytest.approx(3 / 5.0)
    assert figures["TTFT p50 s"] == pytest.approx(0.5)
    assert figures["TTFT p99 s"] == pytest.approx(0.5 + 0.98 * 0.5)
    assert figures["TPOT p50 ms"] == pytest.approx(100.0)  # the 1-token request has no TPOT
    assert figures["prefill step ms"] == pytest.approx(200.0) and figures["decode step ms"] == pytest.approx(50.0)


def test_rows_average_runs_and_report_spread_ratio_and_error():
    def figures(value):
        return Figures({metric: value for metric in METRICS})

    rows = rows_of("TP1", [figures(1.2), figures(1.2)], [figures(0.9), figures(1.1)])
    assert [row.metric for row in rows] == list(METRICS)
    row = rows[0]
    assert row.measured == pytest.approx(1.0) and row.spread == pytest.approx(0.2)
    assert row.ratio == pytest.approx(1.2) and row.error == pytest.approx(0.2)
    assert Row("a", "m", 0.5, 1.0, 0.0).error == pytest.approx(0.5)
    mixed = [Row("a", "m", p, 1.0, 0.0) for p in (1.1, 0.8, 1.05, math.nan)]
    assert summary(mixed) == (pytest.approx(0.1), pytest.approx(0.2))
    table = markdown_table(rows)
    assert "| TP1 | TTFT p50 s | 1.2 | 1 | 20% | 1.20 |" in table
    assert "median |error| 20%, worst 20%" in table


def test_cost_is_a_roofline_on_cpus_and_gpus():
    """The engine's CPU linear layers prefetch weights while they compute: time is the larger of the two."""
    bare = DeviceSpec(memory_gb=12, tflops=0.07, mem_bandwidth_gbs=18, kind="cpu")
    cpu = StageCost(SMOLLM, bare, 1, LINK, False, False)
    gpu = StageCost(SMOLLM, bare.model_copy(update={"kind": "cuda"}), 1, LINK, False, False)
    for batch in (1, 4, 64):  # memory-bound, then compute-bound
        flops = 2 * SMOLLM.params_per_layer * batch / bare.flops + 4 * SMOLLM.hidden_size * batch * 129 / bare.flops
        memory = (SMOLLM.layer_bytes + SMOLLM.kv_bytes_per_token_per_layer * batch * 129) / bare.bandwidth_bytes
        assert cpu.decode_time(1, batch, 128) == gpu.decode_time(1, batch, 128) == pytest.approx(max(flops, memory))


def test_allreduce_latency_is_taken_per_group_size_where_measured():
    assert allreduce_time(0.0, 2, LINK) == pytest.approx(0.6e-3)
    assert allreduce_time(0.0, 3, LINK) == pytest.approx(3.0e-3)
    ring = LinkSpec(bandwidth_gbps=30, latency_ms=1.0)
    assert allreduce_time(0.0, 3, ring) == pytest.approx(4 * 1.0e-3)


def test_overhead_fit_recovers_the_parameters_that_made_the_timings():
    truth = DEVICE.device().model_copy(update={"tflops": 0.05, "overhead_ms_per_layer": 0.7, "gemm_weight_passes": 1.0,
                                               "overhead_us_per_kv_token": 1.5, "overhead_ms_per_step": 3.0})
    measured_device = truth.model_copy(update={"tflops": 0.08})  # the microbenchmark's figure: too fast
    stage = StageCost(SMOLLM, truth, 1, LINK, True, True)
    shapes = [CalibrationShape(1, 1, 128), CalibrationShape(8, 1, 96), CalibrationShape(1, 64, 64),
              CalibrationShape(16, 1, 128)]  # memory-bound and compute-bound steps
    timings = [StageTiming(s, layers, s.step_time(stage, layers), 0.0) for layers in (30, 10) for s in shapes]
    fit = fit_overheads(timings, SMOLLM, measured_device)
    assert fit.tflops == pytest.approx(0.05, rel=1e-6)
    assert (fit.ms_per_layer, fit.us_per_kv_token, fit.ms_per_step) == pytest.approx((0.7, 1.5, 3.0), rel=1e-5)
    assert faster_than_memory(timings, SMOLLM, measured_device) == []
    # three times faster: decode steps beat their weight stream, which calibrate flags; prefill is compute
    fast = [StageTiming(t.shape, t.num_layers, t.median_s / 3, 0.0) for t in timings]
    flagged = {(t.shape, t.num_layers) for t in faster_than_memory(fast, SMOLLM, measured_device)}
    assert (CalibrationShape(1, 1, 128), 30) in flagged and not any(shape.num_new_tokens > 1 for shape, _ in flagged)


def test_deployments_run_as_planned_with_each_replicas_predicted_throughput():
    config = deployment_config("2xTP1")
    costs = predicted_costs(config, DEVICE)
    workload = WorkloadSpec(rate=2.0, prompt_len=64, output_len=32, slo_seconds=1e9, num_requests=24)
    planned = as_planned(config, costs, workload)
    first, second = (r.predicted_throughput_rps for r in planned.replicas)
    assert first == second == pytest.approx(costs[0].throughput_rps(64, 32, 96)) and first > 0
    assert [r.stages for r in planned.replicas] == [r.stages for r in config.replicas]
    assert all(r.predicted_throughput_rps is None for r in config.replicas)  # the input is left as it was


def test_workers_beyond_the_cores_share_them():
    device = DEVICE.device()
    assert shared_device(device, 2, 2) == device
    half = shared_device(device, 4, 2)
    assert half.tflops == pytest.approx(device.tflops / 2) and half.overhead_ms_per_step == pytest.approx(4.0)
    # 3 workers that keep waiting for one another on 2 cores run in 2 rounds: half speed, not 2/3
    assert shared_device(device, 3, 2) == half
    (alone,) = predicted_costs(deployment_config("TP3"), DEVICE, num_cores=3)
    (shared,) = predicted_costs(deployment_config("TP3"), DEVICE, num_cores=2)
    decode = StepTokens(query_lens=(1,), context_lens=(64,), num_sampled=1)
    assert step_seconds(shared, decode) > step_seconds(alone, decode)


def test_steps_of_several_tokens_stream_the_weights_gemm_weight_passes_times():
    bare = DeviceSpec(memory_gb=12, tflops=1e6, mem_bandwidth_gbs=18, kind="cpu")
    one, two = (StageCost(SMOLLM, bare.model_copy(update={"gemm_weight_passes": p}), 1, LINK, False, False)
                for p in (1.0, 2.0))
    weight_time = SMOLLM.layer_bytes / bare.bandwidth_bytes
    assert two.decode_time(1, 1, 0) == pytest.approx(one.decode_time(1, 1, 0))  # one token: a GEMV, one pass
    assert two.decode_time(1, 2, 0) - one.decode_time(1, 2, 0) == pytest.approx(weight_time, rel=1e-3)


def test_tp_calibration_spreads_unexplained_step_time_over_the_all_reduces():
    config = deployment_config("TP3")
    no_latency = DEVICE.model_copy(update={"link": LINK.model_copy(
        update={"allreduce_latency_ms": 0.0, "allreduce_latency_ms_by_tp": {3: 0.0}})})
    (bare,) = predicted_costs(config, no_latency)
    shapes = [StepTokens(query_lens=(64, 16), context_lens=(64, 16), num_sampled=2),
              StepTokens(query_lens=(1,) * 8, context_lens=(70,) * 8, num_sampled=8)]
    # each step took the model's time plus 2.5 ms for each of its 2 x 30 all-reduces
    steps = [MeasuredStep("r0", shape, {0: step_seconds(bare, shape) + 60 * 2.5e-3}) for shape in shapes]
    assert latency_per_call(DEVICE, config, steps) == pytest.approx([2.5e-3, 2.5e-3])
    # and the fitted figure, written back, makes the cost model explain the steps
    fitted = DEVICE.model_copy(update={"link": LINK.model_copy(update={"allreduce_latency_ms_by_tp": {3: 2.5}})})
    (cost,) = predicted_costs(config, fitted)
    for step in steps:
        assert step_seconds(cost, step.shape) == pytest.approx(step.stage_seconds[0], rel=0.02)
