"""Cost model formulas: KV sharding, GQA, MLP width, all-reduce, memory checks, step-time shape."""

import dataclasses

import pytest

from hexcore.config import EngineSpec, parse_config
from planning.inputs.cluster import ClusterSpec, build_cluster
from planning.cost.stage_cost import (
    StageCost,
    allreduce_time,
    kv_bytes_per_token_per_device,
    kv_capacity_tokens,
    weight_bytes_per_device,
)
from planning.inputs.catalog import GPU_CATALOG, LinkSpec
from planning.simulate.evaluate import evaluate_deployment
from planning.inputs.models import load_model
from planning.inputs.workload import WorkloadSpec

LLAMA70 = load_model("llama-2-70b")
LINK = LinkSpec(bandwidth_gbps=80, latency_ms=0.01)


def test_kv_cache_sized_by_kv_heads_and_sharded_by_tp():
    # 8 KV heads x 128 head dim x K and V x 2 bytes = 4 KiB per token per layer (not 64 heads' 32 KiB)
    assert LLAMA70.kv_bytes_per_token_per_layer == 2 * 8 * 128 * 2
    assert kv_bytes_per_token_per_device(LLAMA70, tp=4, layers=10) == 10 * 4096 / 4


def test_layer_parameters_use_the_intermediate_size_and_gqa_projections():
    h, i = 8192, 28672
    assert LLAMA70.params_per_layer == 2 * h * h + 2 * h * 1024 + 3 * h * i
    wider = dataclasses.replace(LLAMA70, intermediate_size=2 * i)
    assert wider.params_per_layer - LLAMA70.params_per_layer == 3 * h * i


def test_ring_allreduce_alpha_beta():
    num_bytes = 8e6
    expected = 2 * 3 * (LINK.latency_s + num_bytes / (4 * LINK.bytes_per_second))
    assert allreduce_time(num_bytes, 4, LINK) == pytest.approx(expected)
    assert allreduce_time(num_bytes, 1, LINK) == 0.0
    measured = LINK.model_copy(update={"allreduce_latency_ms": 1.0})
    assert allreduce_time(0, 4, measured) == pytest.approx(1e-3)


def test_decode_is_bandwidth_bound_and_prefill_compute_bound_on_a_gpu():
    stage = StageCost(LLAMA70, GPU_CATALOG["A100-40G"], 1, LINK, is_first=False, is_last=False)
    scan = LLAMA70.layer_bytes / GPU_CATALOG["A100-40G"].bandwidth_bytes
    assert stage.decode_time(1, batch_size=1, context_len=100) == pytest.approx(scan, rel=0.01)
    assert stage.decode_time(1, 8, 100) < 1.1 * stage.decode_time(1, 1, 100)  # batching is almost free
    flops = 2 * LLAMA70.params_per_layer * 2048 / GPU_CATALOG["A100-40G"].flops
    assert stage.prefill_time(1, 2048) > flops  # matmuls plus attention
    assert stage.prefill_time(2, 512) == pytest.approx(2 * stage.prefill_time(1, 512))


def test_tp_splits_work_and_adds_allreduce():
    device = GPU_CATALOG["A6000"]
    tp1 = StageCost(LLAMA70, device, 1, LINK, False, False).decode_time(10, 16, 200)
    tp4 = StageCost(LLAMA70, device, 4, LINK, False, False).decode_time(10, 16, 200)
    assert tp1 / 4 < tp4 < tp1 / 2


def test_memory_capacity_counts_weights_workspace_and_kv():
    device = GPU_CATALOG["A4000"]
    assert weight_bytes_per_device(LLAMA70, 2, 12, False, False) == 12 * LLAMA70.layer_bytes / 2
    fits = kv_capacity_tokens(LLAMA70, device, 2, 12, False, True, 512, 64)
    assert fits > 10_000
    assert kv_capacity_tokens(LLAMA70, device, 2, 20, False, False, 512, 64) < 0  # 17 GB of weights on 16 GB


def _case_study():
    return build_cluster(ClusterSpec.model_validate({"nodes": [
        {"name": "a6000", "gpu": "A6000", "count": 4, "site": "lab"},
        {"name": "a5000", "gpu": "A5000", "count": 2, "site": "lab"},
        {"name": "a4000", "gpu": "A4000", "count": 2, "site": "lab"},
    ]}))


def test_memory_check_rejects_a_plan_that_does_not_fit_and_accepts_one_that_does():
    workload = WorkloadSpec(rate=1, prompt_len=128, output_len=64, slo_seconds=20, num_requests=10)
    stages = [(["a6000/cuda:0", "a6000/cuda:1", "a6000/cuda:2", "a6000/cuda:3"], 40),
              (["a5000/cuda:0", "a5000/cuda:1"], 20), (["a4000/cuda:0", "a4000/cuda:1"], 20)]
    raw = {"dtype": "float16", "replicas": [{"stages": [{"devices": d, "layers": n} for d, n in stages]}]}
    with pytest.raises(ValueError, match=r"does not fit in memory: stage 2 \(20 layers, TP 2\) on a4000/0 \(A4000\)"):
        evaluate_deployment(_case_study(), LLAMA70, parse_config(raw), workload)
    raw["replicas"][0]["stages"][0]["layers"], raw["replicas"][0]["stages"][2]["layers"] = 48, 12
    assert evaluate_deployment(_case_study(), LLAMA70, parse_config(raw), workload).predicted.slo_attainment == 1.0
    raw["dtype"] = "float32"  # the same layout at 4 bytes per weight no longer fits
    with pytest.raises(ValueError, match="does not fit in memory"):
        evaluate_deployment(_case_study(), LLAMA70, parse_config(raw), workload)


def test_engine_limits_change_the_workspace():
    small = kv_capacity_tokens(LLAMA70, GPU_CATALOG["A6000"], 4, 40, True, True, 512, 64)
    large = kv_capacity_tokens(LLAMA70, GPU_CATALOG["A6000"], 4, 40, True, True, 8192, 64)
    assert large < small
    assert EngineSpec().max_num_batched_tokens == 512
