"""Cluster, workload and model inputs: schemas, catalog, device spec files, HF configs."""

import json
from pathlib import Path

import pytest
import yaml

from planning.inputs.cluster import load_cluster
from planning.inputs.catalog import GPU_CATALOG
from planning.inputs.models import BUILTIN_MODELS, load_model
from planning.inputs.workload import load_workload, make_requests

ISSUE_CLUSTER = """
gpus:
  MyGPU: {memory_gb: 24, tflops: 100, mem_bandwidth_gbs: 900}
nodes:
  - {name: iceland-0, site: iceland, gpu: RTX3090Ti, count: 8, price_per_hour: 4.2}
  - {name: illinois-0, site: illinois, gpu: A6000, count: 8}
  - {name: norway-0, site: norway, gpu: MyGPU, count: 2}
links:
  intra_node: {bandwidth_gbps: 100, latency_ms: 0.01}
  intra_site: {bandwidth_gbps: 10, latency_ms: 0.1}
  inter_site: {bandwidth_gbps: 1, latency_ms: 30}
  overrides:
    - {sites: [iceland, norway], bandwidth_gbps: 5, latency_ms: 10}
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_issue_cluster_example_loads_with_links_by_class_and_override(tmp_path):
    cluster = load_cluster(write(tmp_path, "c.yaml", ISSUE_CLUSTER))
    assert cluster.num_devices == 18
    assert cluster.nodes[2].device.memory_gb == 24
    assert cluster.link(0, 0).bandwidth_gbps == 100
    assert cluster.link(0, 1).latency_ms == 30
    assert cluster.link(0, 2).latency_ms == 10 and cluster.link(2, 0).bandwidth_gbps == 5
    assert cluster.price_per_hour is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw.update(extra=1), "extra"),
        (lambda raw: raw["nodes"][0].update(gpus="A100"), "gpus"),
        (lambda raw: raw["links"]["intra_node"].update(speed=3), "speed"),
        (lambda raw: raw["nodes"][0].update(gpu="B200"), "unknown gpu 'B200'"),
        (lambda raw: raw["links"]["overrides"][0].update(sites=["iceland", "mars"]), "unknown sites"),
        (lambda raw: raw["nodes"].append(dict(raw["nodes"][0])), "duplicate node names"),
    ],
)
def test_cluster_errors_name_the_problem(tmp_path, edit, message):
    raw = yaml.safe_load(ISSUE_CLUSTER)
    edit(raw)
    with pytest.raises(ValueError, match=message):
        load_cluster(write(tmp_path, "c.yaml", yaml.safe_dump(raw)))


def test_catalog_has_exactly_the_issue_names_each_with_a_source():
    assert set(GPU_CATALOG) == {
        "A100-40G", "A100-80G", "H100", "L40S", "A40", "A6000", "A5000", "A4000", "RTX3090Ti", "RTX4090", "V100", "T4",
    }
    assert all(spec.source for spec in GPU_CATALOG.values())


def test_device_spec_file_is_usable_as_gpu_type_and_link(tmp_path):
    devices = tmp_path / "devices"
    devices.mkdir()
    write(devices, "local-cpu.yaml", yaml.safe_dump({
        "name": "local-cpu", "kind": "cpu", "memory_gb": 8, "tflops": 0.2, "mem_bandwidth_gbs": 10,
        "overhead_ms_per_layer": 0.3, "link": {"bandwidth_gbps": 20, "latency_ms": 0.05, "allreduce_latency_ms": 0.2},
    }))
    cluster = load_cluster(write(tmp_path, "c.yaml", yaml.safe_dump({
        "gpus": {"local-cpu": "devices/local-cpu.yaml"},
        "nodes": [{"name": "here", "gpu": "local-cpu", "count": 2}],
        "links": {"intra_node": "devices/local-cpu.yaml"},
    })))
    assert cluster.nodes[0].device.kind == "cpu" and cluster.nodes[0].device.overhead_ms_per_layer == 0.3
    assert cluster.link(0, 0).allreduce_latency_ms == 0.2


def test_workload_fixed_or_trace_and_seeded_poisson(tmp_path):
    fixed = load_workload(write(tmp_path, "w.yaml", "rate: 2.0\nprompt_len: 128\noutput_len: 64\nslo_seconds: 20\n"))
    requests = make_requests(fixed)
    assert len(requests) == 200 and requests == make_requests(fixed)
    assert 1.6 < len(requests) / requests[-1].arrival < 2.4
    trace = load_workload(write(tmp_path, "t.yaml", "rate: 1\ntrace: [[10, 5], [20, 7]]\nslo_seconds: 5\nnum_requests: 3\n"))
    assert [(r.prompt_len, r.output_len) for r in make_requests(trace)] == [(10, 5), (20, 7), (10, 5)]
    for bad, message in [("rate: 1\nprompt_len: 3\nslo_seconds: 1\n", "either"), (
            "rate: 1\nprompt_len: 3\noutput_len: 2\nslo_seconds: 1\nburst: 2\n", "burst")]:
        with pytest.raises(ValueError, match=message):
            load_workload(write(tmp_path, "bad.yaml", bad))


def test_builtin_models_and_hf_config(tmp_path):
    assert set(BUILTIN_MODELS) == {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "smollm2-135m"}
    llama70 = load_model("llama-2-70b")
    assert 68e9 < llama70.weight_bytes / 2 < 70e9  # ~69B parameters
    assert llama70.valid_tp_degrees() == [1, 2, 4, 8]  # TP must divide the 8 KV heads
    config = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
              "num_key_value_heads": 3, "vocab_size": 49152, "torch_dtype": "bfloat16", "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_dir = load_model(str(tmp_path))
    assert from_dir.path == str(tmp_path) and from_dir.kv_dim == 192 and from_dir.dtype_bytes == 2
    assert 130e6 < from_dir.weight_bytes / 2 < 140e6  # SmolLM2-135M
    with pytest.raises(ValueError, match="unknown model"):
        load_model("gpt-5")


CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def test_shipped_configs_load_and_match_the_paper_pools():
    clusters = {path.stem: load_cluster(path) for path in (CONFIGS / "clusters").glob("*.yaml")}
    for path in (CONFIGS / "workloads").glob("*.yaml"):
        load_workload(path)
    sizes = {name: (c.num_devices, c.price_per_hour) for name, c in clusters.items()}
    assert sizes["paper-homogeneous-16xA100"] == (16, pytest.approx(65.54))
    assert sizes["paper-heterogeneous-58gpu"] == (58, pytest.approx(65.04))
    assert sizes["paper-heterogeneous-half-budget"] == (30, pytest.approx(29.6))
    assert len(clusters["paper-heterogeneous-58gpu"].sites) == 4
    assert clusters["local-cpu"].nodes[0].device.kind == "cpu"
