"""`hexgen calibrate --nodes`: the cluster file it writes, the message sizes its link probe picks, its
argument checks, and (slow) three emulated hosts on links shaped at 1 Gbit/s and 50 Mbit/s, measured
and planned on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from hexcore.executor.ports import free_port
from planning.calibrate.cluster import MeasuredPair, write_cluster_file
from planning.calibrate.pair import MAX_BYTES, MIN_LARGEST_BYTES, PROBE_BYTES, PairTiming, next_probe
from planning.inputs.cluster import load_cluster
from server.entrypoint import main

REPO = Path(__file__).resolve().parents[3]


def device_text(name: str, tflops: float) -> str:
    return "# measured on a node\n" + yaml.safe_dump({"name": name, "memory_gb": 4.0, "tflops": tflops,
                                                      "mem_bandwidth_gbs": 10.0, "kind": "cpu"})


def pair(a: str, b: str, latency_s: float, bytes_per_second: float) -> MeasuredPair:
    sizes = (4 << 10, 512 << 10, 1 << 20)
    return MeasuredPair((a, b), PairTiming(sizes, (latency_s, *(latency_s + size / bytes_per_second for size in sizes[1:]))))


def test_the_cluster_file_gives_each_node_its_device_and_each_pair_its_measured_link(tmp_path):
    pairs = [pair("x", "y", 1e-4, 125e6), pair("x", "z", 2e-4, 125e6), pair("y", "z", 5e-3, 6.25e6)]
    path = write_cluster_file(tmp_path / "c.yaml", {"x": device_text("x-cpu", 0.1), "y": device_text("y-cpu", 0.2),
                                                    "z": device_text("z-cpu", 0.3)}, pairs, header=["a test"])
    cluster = load_cluster(path)
    assert [(n.name, n.site, n.count, n.device.tflops) for n in cluster.nodes] == [
        ("x", "x", 1, 0.1), ("y", "y", 1, 0.2), ("z", "z", 1, 0.3)]
    assert (tmp_path / "c-devices" / "y.yaml").read_text().startswith("# measured on a node")
    x, y, z = range(3)
    assert cluster.link(x, y).bandwidth_gbps == pytest.approx(1.0, rel=1e-3)  # 125 MB/s
    assert cluster.link(y, x).latency_ms == pytest.approx(0.1, rel=1e-3)
    assert cluster.link(x, z).latency_ms == pytest.approx(0.2, rel=1e-3)
    assert cluster.link(z, y).bandwidth_gbps == pytest.approx(0.05, rel=1e-3) and cluster.link(z, y).latency_ms == 5.0
    assert cluster.inter_site == cluster.link(y, z), "the default between sites is the slowest pair"
    text = path.read_text()
    assert text.startswith("# a test\n") and "y <-> z: 50 Mbit/s, latency 5.000 ms (4 KiB: " in text


def test_one_node_is_a_cluster_file_without_links(tmp_path):
    cluster = load_cluster(write_cluster_file(tmp_path / "one.yaml", {"solo": device_text("solo-cpu", 0.1)}, []))
    assert [n.name for n in cluster.nodes] == ["solo"]


def test_a_pair_whose_time_does_not_grow_with_size_is_an_error_naming_it():
    flat = MeasuredPair(("x", "y"), PairTiming((4096, 65536, 1 << 20), (1e-3, 9e-4, 8e-4)))
    with pytest.raises(ValueError, match="link x <-> y: cannot fit a bandwidth"):
        flat.link


def test_the_probe_doubles_until_a_quarter_of_the_target_then_picks_what_the_rate_carries_in_it():
    assert next_probe(PROBE_BYTES, one_way_s=0.001, target_s=0.03) == (False, 2 * PROBE_BYTES)
    is_done, largest = next_probe(1 << 20, one_way_s=0.01, target_s=0.03)  # 100 MiB/s: 3 MiB in 30 ms
    assert is_done and largest == 3 << 20
    assert next_probe(MAX_BYTES, one_way_s=0.001, target_s=0.03) == (True, MAX_BYTES), "never past MAX_BYTES"
    assert next_probe(PROBE_BYTES, one_way_s=1.0, target_s=0.03) == (True, MIN_LARGEST_BYTES), "past any burst"


def test_the_bandwidth_is_the_slope_between_the_largest_messages_past_a_burst_at_line_rate():
    burst, rate = 32 << 10, 50e6 / 8  # a 50 Mbit/s shaper that lets 32 KiB through at once
    sizes = (4 << 10, 96 << 10, 192 << 10)
    timing = PairTiming(sizes, tuple(3e-4 + max(0, size - burst) / rate for size in sizes))
    assert timing.fit.bytes_per_second == pytest.approx(rate) and timing.fit.latency_s == pytest.approx(3e-4)


@pytest.mark.parametrize("args, message", [
    (["--nodes", "a", "--threads-per-worker", "2"], "--threads-per-worker is for one machine"),
    (["--nodes", "a,b,a"], "--nodes: a named more than once"),
    (["--nodes", "a/cpu"], "bad node names"),
    (["--cluster-port", "8478"], "--cluster-port: only with --nodes"),
])
def test_bad_arguments_are_refused_before_anything_starts(args, message, capsys, tmp_path):
    assert main(["calibrate", *args, "-o", str(tmp_path / "c.yaml")]) == 2
    assert message in capsys.readouterr().err


def test_a_node_that_does_not_join_is_named_as_serve_names_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HEXGEN_CLUSTER_TOKEN", "a-cluster-token-for-tests-only")
    assert main(["calibrate", "--nodes", "head,absent", "--cluster-port", str(free_port()), "--join-timeout", "0.5",
                 "-o", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nodes did not join within 0 s: absent" in err and "hexgen node --head 127.0.0.1:" in err
    assert not (tmp_path / "c.yaml").exists()


@pytest.mark.slow  # namespaces, agents, measurement processes
def test_three_hosts_on_shaped_links_are_measured_in_order_and_planned_on(emulated_cluster, tmp_path):
    from tests.hexcore.cluster.test_across_hosts import PORT, environment, start_agent

    shaped_mbit = {("head", "a"): 1000, ("head", "b"): 1000, ("a", "b"): 50}
    cluster = emulated_cluster(["head", "a", "b"], bandwidth_mbit=shaped_mbit)
    agents = [start_agent(cluster, name, cluster.address("head")) for name in ("a", "b")]
    output = tmp_path / "calibrated.yaml"
    run = cluster.run("head", [sys.executable, "-m", "server.entrypoint", "calibrate", "--nodes", "head,a,b", "--quick",
                               "--cluster-host", cluster.address("head"), "--cluster-port", str(PORT),
                               "--join-timeout", "60", "-o", str(output)], env=environment(), cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "a <-> b: " in run.stdout, "a summary of the measured pairs"
    calibrated = load_cluster(output)
    assert [node.name for node in calibrated.nodes] == ["head", "a", "b"]
    measured_mbit = {(a, b): calibrated.link(calibrated.node_index(a), calibrated.node_index(b)).bandwidth_gbps * 1e3
                     for a, b in shaped_mbit}
    for hosts, mbit in shaped_mbit.items():  # gloo's payload under htb's rate, less its headers and waits
        assert mbit / 3 < measured_mbit[hosts] < mbit * 1.2, measured_mbit
    assert measured_mbit[("a", "b")] * 4 < min(measured_mbit[("head", "a")], measured_mbit[("head", "b")])
    assert main(["plan", "--cluster", str(output), "--model", "smollm2-135m", "--workload",
                 str(REPO / "configs/workloads/local-smollm2.yaml"), "--one-replica", "--no-progress",
                 "-o", str(tmp_path / "plan.yaml")]) == 0
    devices = {d for r in yaml.safe_load((tmp_path / "plan.yaml").read_text())["replicas"] for s in r["stages"]
               for d in s["devices"]}
    assert devices and devices <= {"head/cpu", "a/cpu", "b/cpu"}
    for agent in agents:
        assert agent.poll() is None, "the agents stay up after calibrating"
