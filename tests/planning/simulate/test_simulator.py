"""The serving simulator: step accounting, pipelining, load and deadlines."""

import pytest

from hexcore.config import EngineSpec, parse_config
from planning.inputs.cluster import ClusterSpec, build_cluster
from planning.simulate.evaluate import evaluate_deployment, replica_costs
from planning.inputs.models import load_model
from planning.placement import plan_from_config
from planning.simulate.simulator import simulate
from planning.inputs.workload import Request, WorkloadSpec

LLAMA7 = load_model("llama-2-7b")
POOL = build_cluster(ClusterSpec.model_validate({
    "nodes": [{"name": "n", "site": "s", "gpu": "A100-40G", "count": 4},
              {"name": "m", "site": "s", "gpu": "A100-40G", "count": 2}],
    "links": {"intra_node": {"bandwidth_gbps": 800, "latency_ms": 0.01},
              "intra_site": {"bandwidth_gbps": 100, "latency_ms": 2.0}},
}))


def costs(stages, **engine):
    config = parse_config({"dtype": "float16", "engine": engine,
                           "replicas": [{"stages": [{"devices": d, "layers": n} for d, n in stages]}]})
    return replica_costs(POOL, LLAMA7, config, plan_from_config(config, POOL))


def one_request(prompt_len, output_len):
    workload = WorkloadSpec(rate=1, prompt_len=prompt_len, output_len=output_len, slo_seconds=100, num_requests=1)
    return workload, [Request(0.0, prompt_len, output_len)]


def test_single_request_latency_is_prefill_plus_decode_steps():
    (replica,) = costs([(["n/cuda:0"], 32)])
    stage = replica.stages[0]
    workload, requests = one_request(100, 5)
    expected = stage.prefill_time(32, 100) + sum(stage.decode_time(32, 1, 99 + g) for g in range(1, 5))
    predicted = simulate([replica], workload, requests)
    assert predicted.p50_latency_s == pytest.approx(expected)
    assert predicted.p50_ttft_s == pytest.approx(stage.prefill_time(32, 100))


def test_pipeline_pays_stage_times_and_link_latencies_per_step():
    (replica,) = costs([(["n/cuda:0"], 16), (["m/cuda:0"], 16)])
    workload, requests = one_request(10, 3)
    single = simulate([replica], workload, requests).p50_latency_s
    first, last = replica.stages
    hops = 2 * 3 * 2e-3  # three steps, each crossing the 2 ms link there and back
    compute = first.prefill_time(16, 10) + last.prefill_time(16, 10) + sum(
        s.decode_time(16, 1, 9 + g) for s in replica.stages for g in (1, 2))
    assert single == pytest.approx(compute + hops, rel=1e-3)


def test_micro_batches_overlap_the_stages():
    workload = WorkloadSpec(rate=200, prompt_len=512, output_len=2, slo_seconds=100, num_requests=60)
    stages = [(["n/cuda:0"], 16), (["n/cuda:1"], 16)]
    overlapped = simulate(costs(stages), workload).throughput_rps
    serial = simulate(costs(stages, num_micro_batches=1), workload).throughput_rps
    assert overlapped > 1.6 * serial


def test_attainment_falls_and_latency_grows_with_load():
    config = parse_config({"dtype": "float16", "replicas": [{"stages": [{"devices": ["n/cuda:0"], "layers": 32}]}]})
    results = [
        evaluate_deployment(POOL, LLAMA7, config, WorkloadSpec(rate=rate, prompt_len=256, output_len=128,
                                                               slo_seconds=2, num_requests=150)).predicted
        for rate in (1, 8, 64)
    ]
    assert results[0].slo_attainment == 1.0 and results[-1].slo_attainment < 0.5
    assert results[0].p99_latency_s < results[1].p99_latency_s < results[2].p99_latency_s
    assert results[-1].throughput_rps < 64  # saturated


def test_router_uses_both_replicas_and_beats_one():
    workload = WorkloadSpec(rate=100, prompt_len=256, output_len=128, slo_seconds=8, num_requests=400)
    one = simulate(costs([(["n/cuda:0"], 32)]), workload)
    two = simulate(costs([(["n/cuda:0"], 32)]) + costs([(["n/cuda:1", "n/cuda:2"], 32)]), workload)
    assert two.throughput_rps > 1.5 * one.throughput_rps
    assert two.slo_attainment > one.slo_attainment


def test_requests_larger_than_the_kv_capacity_are_unservable_misses():
    (replica,) = costs([(["n/cuda:0"], 32)], max_num_seqs=1)
    workload = WorkloadSpec(rate=1, prompt_len=10, output_len=2, slo_seconds=10, num_requests=2)
    too_long = [Request(0.0, 10, 2), Request(0.1, replica.kv_capacity_tokens, 2)]
    predicted = simulate([replica], workload, too_long)
    assert predicted.num_unservable == 1 and predicted.slo_attainment == 0.5
    assert EngineSpec().max_num_seqs == 64


def test_no_finished_request_reports_null_latencies():
    (replica,) = costs([(["n/cuda:0"], 32)])
    workload = WorkloadSpec(rate=1, prompt_len=10, output_len=2, slo_seconds=10, num_requests=1)
    predicted = simulate([replica], workload, [Request(0.0, replica.kv_capacity_tokens, 2)])
    assert predicted.summary() == {"slo_attainment": 0.0, "throughput_rps": 0.0, "p50_latency_s": None,
                                   "p99_latency_s": None}
