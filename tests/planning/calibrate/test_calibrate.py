"""`hexgen calibrate --quick` writes a device spec file that the planner's cluster file loads."""

import pytest
import yaml

from planning.calibrate.command import Calibration, LayerCheck
from planning.calibrate.links import AlphaBeta
from planning.inputs.cluster import load_cluster
from planning.cost.stage_cost import StageCost, allreduce_time
from planning.inputs.catalog import load_device_file
from planning.inputs.models import BUILTIN_MODELS
from server.entrypoint import main


@pytest.fixture(scope="module")
def device_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("devices") / "local-cpu.yaml"
    assert main(["calibrate", "--quick", "-o", str(path)]) == 0
    return path


@pytest.mark.slow  # runs calibrate: worker processes
def test_calibration_file_is_a_valid_device_spec_with_a_link(device_path):
    device_file = load_device_file(device_path)
    assert device_file.name == "local-cpu" and device_file.kind == "cpu"
    device = device_file.device()
    # anything a CPU core can do: 1 GFLOPS .. 10 TFLOPS, 0.5 .. 1000 GB/s
    assert 1e-3 < device.tflops < 10 and 0.5 < device.mem_bandwidth_gbs < 1000
    assert device.memory_gb > 0 and device.overhead_ms_per_layer >= 0
    assert device_file.link.bandwidth_gbps > 0 and device_file.link.allreduce_latency_ms is not None
    text = device_path.read_text()
    assert "# gloo between worker processes" in text and "decode, batch 1" in text


@pytest.mark.slow  # runs calibrate: worker processes
def test_calibration_file_round_trips_into_a_cluster_and_a_cost_model(device_path, tmp_path):
    cluster_path = tmp_path / "cluster.yaml"
    cluster_path.write_text(yaml.safe_dump({
        "gpus": {"local-cpu": str(device_path)},
        "nodes": [{"name": "local", "gpu": "local-cpu", "count": 2}],
        "links": {"intra_node": str(device_path)},
    }))
    cluster = load_cluster(cluster_path)
    device, link = cluster.nodes[0].device, cluster.link(0, 0)
    assert device == load_device_file(device_path).device()
    assert link == load_device_file(device_path).link
    model = BUILTIN_MODELS["smollm2-135m"].with_dtype("float32")
    tp1 = StageCost(model, device, tp=1, tp_link=link, is_first=True, is_last=True)
    tp2 = StageCost(model, device, tp=2, tp_link=link, is_first=True, is_last=True)
    decode_tp1 = tp1.decode_time(model.num_layers, batch_size=1, context_len=128)
    # a decode step at least scans every weight once at the measured bandwidth
    assert decode_tp1 >= model.weight_bytes / 2 / device.bandwidth_bytes
    # TP 2 halves the scan but pays two measured all-reduces per layer
    all_reduces = 2 * model.num_layers * allreduce_time(model.hidden_size * 4, 2, link)
    assert tp2.decode_time(model.num_layers, 1, 128) >= all_reduces >= link.allreduce_latency_ms / 1e3


def test_overhead_is_decode_at_batch_one_beyond_the_roofline_and_never_negative():
    def calibration(measured_s: float) -> Calibration:
        layers = (LayerCheck("decode, batch 1", measured_s, 0.1, roofline_s=0.002), LayerCheck("prefill", 1.0, 0.1, 0.5))
        return Calibration("float32", 1, 8.0, (), layers, ())

    assert calibration(0.0035).overhead_ms_per_layer == pytest.approx(1.5)
    assert calibration(0.0015).overhead_ms_per_layer == 0.0


def test_alpha_beta_fit_recovers_latency_and_bandwidth():
    sizes = [4 << 10, 64 << 10, 1 << 20, 8 << 20]
    fit = AlphaBeta.fit(sizes, [2e-4 + size / 3e9 for size in sizes])
    assert fit.latency_s == pytest.approx(2e-4) and fit.bytes_per_second == pytest.approx(3e9)
    with pytest.raises(ValueError, match="bandwidth"):
        AlphaBeta.fit(sizes, [1e-3, 9e-4, 8e-4, 7e-4])


def test_calibrate_rejects_more_threads_than_cores(capsys):
    assert main(["calibrate", "--quick", "--threads-per-worker", "999", "-o", "/nonexistent/x.yaml"]) == 2
    assert "--threads-per-worker" in capsys.readouterr().err
