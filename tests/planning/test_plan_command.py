"""`hexgen plan` and `hexgen simulate`: files the server loads, the JSON contract, errors."""

import json
from pathlib import Path

import pytest
import yaml

from hexcore.config import check_against_model, load_config
from server.entrypoint import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CASE_STUDY = str(CONFIGS / "clusters" / "case-study-a6000-a5000-a4000.yaml")
CASE_WORKLOAD = str(CONFIGS / "workloads" / "case-study.yaml")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def small(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"nodes": [
        {"name": "box", "site": "lab", "gpu": "T4", "count": 4},
        {"name": "big", "site": "lab", "gpu": "A4000", "count": 2},
    ]}))
    workload = tmp_path / "workload.yaml"
    workload.write_text("rate: 4\nprompt_len: 64\noutput_len: 32\nslo_seconds: 2\nnum_requests: 30\n")
    return str(cluster), str(workload)


def test_plan_json_matches_the_contract_and_the_file_loads(small, tmp_path, capsys):
    cluster, workload = small
    out_file = tmp_path / "plan.yaml"
    code, out, err = run(capsys, "plan", "--cluster", cluster, "--model", "llama-2-7b", "--workload", workload,
                         "-o", str(out_file), "--seed", "3", "--json", "--generations", "4")
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"replicas", "predicted", "max_sustainable_rate_rps", "search_seconds"}
    assert result["max_sustainable_rate_rps"] > 0
    assert set(result["predicted"]) == {"slo_attainment", "throughput_rps", "p50_latency_s", "p99_latency_s"}
    for replica in result["replicas"]:
        assert set(replica) == {"stages", "predicted_throughput_rps"}
        for stage in replica["stages"]:
            assert set(stage) == {"devices", "layers", "tp"} and stage["tp"] == len(stage["devices"])
            assert all(d.startswith(("box/cuda:", "big/cuda:")) for d in stage["devices"])
    config = load_config(out_file)
    assert [[s.devices for s in r.stages] for r in config.replicas] == [
        [s["devices"] for s in r["stages"]] for r in result["replicas"]]
    assert all(r.num_layers == 32 for r in config.replicas) and config.dtype == "float16"
    text = out_file.read_text()
    assert text.startswith("# Planned by `hexgen plan`") and "SLO attainment" in text.split("model:")[0]
    assert "plan" in err  # the progress bar went to stderr

    code, out, _ = run(capsys, "simulate", "--cluster", cluster, "--model", "llama-2-7b", "--workload", workload,
                       "--plan", str(out_file), "--json")
    assert code == 0
    assert json.loads(out) == {**result["predicted"], "max_sustainable_rate_rps": result["max_sustainable_rate_rps"]}


def test_case_study_one_replica_plan_and_symmetric_refusal(tmp_path, capsys):
    out_file = tmp_path / "case.yaml"
    code, out, _ = run(capsys, "plan", "--cluster", CASE_STUDY, "--model", "llama-2-70b", "--workload", CASE_WORKLOAD,
                       "-o", str(out_file), "--one-replica", "--json")
    assert code == 0
    (replica,) = json.loads(out)["replicas"]
    assert sorted((s["tp"], s["layers"]) for s in replica["stages"]) == [(2, 14), (2, 24), (4, 42)]
    assert "# built-in planner model" in out_file.read_text()
    code, _, err = run(capsys, "plan", "--cluster", CASE_STUDY, "--model", "llama-2-70b", "--workload", CASE_WORKLOAD,
                       "-o", str(tmp_path / "sym.yaml"), "--one-replica", "--symmetric")
    assert code != 0 and "infeasible pool: no symmetric layout" in err


def test_infeasible_pool_exits_non_zero_with_the_reason(small, tmp_path, capsys):
    cluster, workload = small
    code, out, err = run(capsys, "plan", "--cluster", cluster, "--model", "llama-2-70b", "--workload", workload,
                         "-o", str(tmp_path / "p.yaml"), "--no-progress")
    assert code != 0 and out == ""
    assert "infeasible pool: llama-2-70b needs 138.0 GB" in err
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize(
    "devices, message",
    [
        (["nowhere/cuda:0"], "node 'nowhere' is not in the cluster"),
        (["box/cuda:7"], "node 'box' has only 4 devices"),
        (["box/cuda:0", "box/cuda:0"], "used twice"),
        (["cuda:0"], "names no node"),
    ],
)
def test_simulate_rejects_devices_not_in_the_cluster(small, tmp_path, capsys, devices, message):
    cluster, workload = small
    plan = tmp_path / "hand.yaml"
    plan.write_text(yaml.safe_dump({"dtype": "float16", "replicas": [{"stages": [{"devices": devices, "layers": 32}]}]}))
    code, _, err = run(capsys, "simulate", "--cluster", cluster, "--model", "llama-2-7b", "--workload", workload,
                       "--plan", str(plan))
    assert code != 0 and message in err


def test_simulate_a_hand_written_plan_prints_figures(small, tmp_path, capsys):
    cluster, workload = small
    plan = tmp_path / "hand.yaml"
    plan.write_text(yaml.safe_dump({"dtype": "float16", "replicas": [
        {"stages": [{"devices": ["big/cuda:0"], "layers": 20}, {"devices": ["big/cuda:1"], "layers": 12}]},
        {"stages": [{"devices": ["box/cuda:0", "box/cuda:1"], "layers": 32}]},
    ]}))
    code, out, _ = run(capsys, "simulate", "--cluster", cluster, "--model", "llama-2-7b", "--workload", workload,
                       "--plan", str(plan))
    assert code == 0 and "SLO attainment" in out and "replica r1" in out


def test_plan_for_an_hf_model_path_names_it_and_fits_the_engine_checks(tmp_path, capsys):
    config = {"num_hidden_layers": 6, "hidden_size": 96, "intermediate_size": 224, "num_attention_heads": 6,
              "num_key_value_heads": 3, "vocab_size": 416, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cluster = tmp_path / "cpu.yaml"
    cluster.write_text(yaml.safe_dump({
        "gpus": {"box-cpu": {"kind": "cpu", "memory_gb": 2, "tflops": 0.05, "mem_bandwidth_gbs": 10,
                             "overhead_ms_per_layer": 0.2}},
        "nodes": [{"name": "box", "gpu": "box-cpu", "count": 3}],
    }))
    workload = tmp_path / "w.yaml"
    workload.write_text("rate: 5\nprompt_len: 32\noutput_len: 16\nslo_seconds: 1\nnum_requests: 20\n")
    out_file = tmp_path / "plan.yaml"
    code, _, _ = run(capsys, "plan", "--cluster", str(cluster), "--model", str(tmp_path), "--workload", str(workload),
                     "-o", str(out_file), "--no-progress")
    assert code == 0
    plan = load_config(out_file)
    assert plan.model == str(tmp_path) and plan.dtype == "float32"
    assert {d for r in plan.replicas for s in r.stages for d in s.devices} == {"cpu"}
    check_against_model(plan, num_layers=6, num_heads=6, num_kv_heads=3)
