"""Issue 17: HexGen's claim on real execution. An emulated heterogeneous cluster is calibrated, planned,
served and benchmarked end to end; the planner's plan against the best symmetric plan and a naive one.

    .venv/bin/python -m planning.experiments.emulated_cluster [--rates 0.4 0.8 ...] [--seconds 60]
    .venv/bin/python -m planning.experiments.emulated_cluster --report   # table and plot from the saved points

Needs root (network namespaces, tc, cgroup v1 cpu). The cluster (planning/emulation):
- hosts `head`, `a`, `b` (site s1) and `c` (site s2), each a network namespace; links shaped with htb to
  1 Gbit/s inside a site and 50 Mbit/s across;
- one cpu device on each of a, b, c, whose host runs `hexgen node` in a cgroup with a CPU quota
  (DEVICE_CORES: 0.8, 0.2 and 0.2 of a core, CFS period 10 ms) and a memory budget (DEVICE_MEMORY_GB) that
  the cluster file gives the planner and the deployment gives the engine: none of the three holds the
  whole model (fp32 weights, workspace and useful KV); the head only runs `hexgen serve` (HTTP, driver) and
  the load generator, in a cgroup without a quota.
Steps: `hexgen calibrate --nodes a,b,c --quick` on the head measures, through the agents, every pair's
link and every node's device and memory budget; its quick 4-term device fit is noise under a quota, so
each device's speed is also measured as it runs (the engine's own stage timed on its host, inside its
quota) and its spec is this machine's full calibration at that speed (REFERENCE_DEVICE); the cluster
file: calibrate's nodes and measured links with those devices; `hexgen plan` (default settings) and `hexgen plan
--symmetric` (every stage the same TP degree and layer count) choose plans for the workload at PLAN_RATE;
the naive plan splits the layers evenly over a, b, c in host order. Each plan is served across the hosts
by `hexgen serve` and driven by `hexgen bench serve` (Poisson arrivals, fixed prompt and output lengths)
at every rate; beside each measurement the simulator's prediction for the same arrival times. A plan
whose measured attainment falls below STOP_BELOW is not driven at higher rates (predicted only).
Everything is torn down at the end, on failure and on Ctrl-C (the harness kills every process of its
namespaces and removes them and the cgroups).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from hexcore.config import check_against_model, load_config
from hexcore.model.files import resolve_model_dir
from planning.calibrate.engine import StepShape, time_engine_stage
from planning.cost.stage_cost import StageCost
from planning.emulation.deploy import REPO, bench_serve, hexgen_argv, start_agent, start_head, wait_healthy
from planning.emulation.harness import EmulatedCluster
from planning.experiments.paper_comparison import TARGET, highest_rate
from planning.inputs.catalog import DeviceFile, DeviceSpec, LinkSpec, load_device_file
from planning.inputs.cluster import load_cluster
from planning.inputs.models import load_model
from planning.inputs.workload import Request, WorkloadSpec
from planning.loadgen.command import arrival_offsets
from planning.placement import describe_shapes, plan_from_config
from planning.simulate.capacity import saturated_throughput_rps
from planning.simulate.evaluate import replica_costs
from planning.simulate.simulator import simulate

RESULTS = Path(__file__).parent / "results"
HEAD = "head"
SITES = {"head": "s1", "a": "s1", "b": "s1", "c": "s2"}
BANDWIDTH_MBIT = {("s1", "s1"): 1000.0, ("s1", "s2"): 50.0}
DEVICE_CORES = {"a": 0.8, "b": 0.2, "c": 0.2}  # one cpu device per host
DEVICE_MEMORY_GB = {"a": 0.6, "b": 0.6, "c": 0.6}
CPU_PERIOD_US = 10_000
LINK_LATENCY_MS = 0.1  # veth + bridge; htb adds no latency of its own
CLUSTER_PORT, HTTP_PORT = 8478, 8000
TOKEN = "emulated-cluster-experiment-token-0123456789"
MODEL = "smollm2-135m"
PROMPT_LEN, OUTPUT_LEN = 32, 32
SLO_SECONDS = 20.0
PLAN_RATE = 1.3
RATES = (0.8, 1.2, 1.6, 2.0, 2.4, 2.8, 3.2)
SECONDS = 50.0  # of arrivals per point
STOP_BELOW = 0.5
SEED = 0
ENGINE = {"num_threads_per_worker": 1, "stall_timeout_seconds": 60.0}
PLANS = ("planner", "symmetric", "naive")
# Each device's speed: the engine's own stage (embedding, SPEED_LAYERS layers, LM head, sampling) timed at
# the workload's shapes on its host, against the cost model of this machine's full calibration
# (REFERENCE_DEVICE, one thread). One scalar per host: a quota scales every term of a step alike, and a
# 4-term fit per host under a quota is noise (measured: two 0.2-core hosts fitted 8.7 and 6.0 ms per layer)
REFERENCE_DEVICE = REPO / "configs" / "devices" / "local-cpu.yaml"
SPEED_SHAPES = (StepShape(1, 1, 48), StepShape(4, 1, 48), StepShape(8, 1, 48), StepShape(1, 32, 32),
                StepShape(4, 32, 32))
SPEED_LAYERS = (16, 6)
SPEED_REPS = 4
LABELS = {"planner": "`hexgen plan`", "symmetric": "best symmetric (`hexgen plan --symmetric`)",
          "naive": "naive (layers evenly over a, b, c)"}


@dataclass(frozen=True)
class Setup:
    """What one run does: the full experiment, or the test's reduced one."""

    rates: tuple[float, ...] = RATES
    seconds: float = SECONDS
    plans: tuple[str, ...] = PLANS
    is_measured_calibration: bool = True  # each host's speed measured; else its CPU quota


def environment() -> dict:
    return {**os.environ, "HEXGEN_CLUSTER_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


# ------------------------------------------------------------------------------------------- calibration

def measure_speeds(cluster: EmulatedCluster, out: Path, stem: str) -> dict[str, float]:
    """Every device's speed measured where it runs: the engine's own stage timed on its host, inside the
    host's quota (`--time-stage-here`), all hosts at once (their quotas keep them apart); per host, the
    median of reference time / measured time over SPEED_SHAPES."""
    reference = load_device_file(REFERENCE_DEVICE).device()

    def one(host: str) -> float:
        path = out / f"{stem}-stage-timings-{host}.json"
        argv = [sys.executable, "-m", "planning.experiments.emulated_cluster", "--time-stage-here", str(path)]
        run = cluster.run(host, argv, env=environment(), cwd=REPO, timeout=900)
        if run.returncode != 0:
            raise RuntimeError(f"timing the engine's stage on {host} failed:\n{run.stderr[-3000:]}")
        return speed(json.loads(path.read_text()), reference)

    with ThreadPoolExecutor(len(DEVICE_CORES)) as pool:
        return dict(zip(DEVICE_CORES, pool.map(one, DEVICE_CORES)))


def time_stage_here(path: Path) -> None:
    """Inside a host: time SPEED_SHAPES on the engine's own stage of SPEED_LAYERS layers (one thread)."""
    timings = time_engine_stage(resolve_model_dir("default"), "float32", 1, SPEED_SHAPES, SPEED_REPS, SPEED_LAYERS)
    path.write_text(json.dumps([{**dataclasses.asdict(t.shape), "num_layers": t.num_layers, "median_s": t.median_s}
                                for t in timings]))


def speed(timings: list[dict], reference: DeviceSpec) -> float:
    """How fast a device runs the engine's stage, relative to the reference device's cost model."""
    model = load_model(MODEL).with_dtype("float32")
    stage = StageCost(model, reference, 1, LinkSpec(bandwidth_gbps=1, latency_ms=0), True, True)
    ratios = []
    for t in timings:
        shape = StepShape(t["num_seqs"], t["num_new_tokens"], t["context_len"])
        ratios.append(shape.step_time(stage, t["num_layers"]) / t["median_s"])
    return statistics.median(ratios)


def scaled_device(reference: DeviceFile, host: str, speed: float, how: str) -> DeviceFile:
    """The reference device at `speed` times its pace: compute and bandwidth times it, fixed overheads over it."""
    return reference.model_copy(update={
        "name": f"{host}-cpu", "tflops": reference.tflops * speed, "mem_bandwidth_gbs": reference.mem_bandwidth_gbs * speed,
        "overhead_ms_per_layer": reference.overhead_ms_per_layer / speed,
        "overhead_ms_per_step": reference.overhead_ms_per_step / speed,
        "overhead_us_per_kv_token": reference.overhead_us_per_kv_token / speed,
        "source": f"{REFERENCE_DEVICE.name} x {speed:.3f} ({how})", "link": None})


def calibrate_across_hosts(cluster: EmulatedCluster, out: Path) -> dict:
    """`hexgen calibrate --nodes a,b,c --quick` on the head, through the agents: every pair's link measured
    (gloo between the hosts) and every node's device profile and memory budget; the cluster file it writes."""
    path = out / "calibrated.yaml"
    argv = hexgen_argv("calibrate", "--nodes", ",".join(DEVICE_CORES), "--quick", "--cluster-host", cluster.address(HEAD),
                       "--cluster-port", str(CLUSTER_PORT), "-o", str(path))
    run = cluster.run(HEAD, argv, env=environment(), cwd=REPO, timeout=1200)
    if run.returncode != 0:
        raise RuntimeError(f"`hexgen calibrate --nodes` failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return yaml.safe_load(path.read_text())


def shaped_links() -> dict:
    """The links as shaped (when not measured): a node's site as in SITES."""
    return {"nodes": [{"name": host, "site": SITES[host]} for host in DEVICE_CORES],
            "links": {"intra_site": {"bandwidth_gbps": BANDWIDTH_MBIT[("s1", "s1")] / 1000, "latency_ms": LINK_LATENCY_MS},
                      "inter_site": {"bandwidth_gbps": BANDWIDTH_MBIT[("s1", "s2")] / 1000, "latency_ms": LINK_LATENCY_MS}}}


def cluster_file(devices: dict[str, DeviceFile], topology: dict) -> dict:
    """The planner's cluster file: the nodes and links of `topology` (a cluster file: `hexgen calibrate`'s,
    or the shaped links), one device per node with its memory budget."""
    gpus = {f"{host}-cpu": {**device.device().model_dump(exclude_none=True), "memory_gb": DEVICE_MEMORY_GB[host]}
            for host, device in devices.items()}
    nodes = [{"name": node["name"], "site": node.get("site", node["name"]), "gpu": f"{node['name']}-cpu", "count": 1}
             for node in topology["nodes"]]
    return {"gpus": gpus, "nodes": nodes, "links": topology["links"]}


# ------------------------------------------------------------------------------------------------- plans

def workload(rate: float, num_requests: int = 200) -> WorkloadSpec:
    return WorkloadSpec(rate=rate, prompt_len=PROMPT_LEN, output_len=OUTPUT_LEN, slo_seconds=SLO_SECONDS,
                        num_requests=num_requests, seed=SEED)


def make_plans(cluster_path: Path, out: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """Deployment files to serve: `hexgen plan` and `hexgen plan --symmetric` for the workload at PLAN_RATE,
    and the naive plan; each with the engine settings and the head's cluster section."""
    workload_path = out / "workload.yaml"
    workload_path.write_text(yaml.safe_dump(workload(PLAN_RATE).model_dump(exclude_none=True)))
    def plan(name: str) -> dict:
        if name == "naive":
            return {"model": "default", "dtype": "float32", "replicas": [{"name": "r0", "stages": [
                {"devices": [f"{host}/cpu"], "layers": 10} for host in DEVICE_CORES]}]}
        planned = out / f"plan-{name}.yaml"
        flags = ["--symmetric"] if name == "symmetric" else []
        run = subprocess.run(hexgen_argv("plan", "--cluster", str(cluster_path), "--model", MODEL, "--workload",
                                         str(workload_path), "-o", str(planned), "--no-progress", *flags),
                             capture_output=True, text=True, cwd=REPO, timeout=600)
        if run.returncode != 0:
            raise RuntimeError(f"`hexgen plan` ({name}) failed:\n{run.stdout}\n{run.stderr}")
        return yaml.safe_load(planned.read_text())

    with ThreadPoolExecutor(len(names)) as pool:  # the searches at once: the hosts are idle meanwhile
        raws = dict(zip(names, pool.map(plan, names)))
    paths = {}
    for name, raw in raws.items():
        raw["engine"] = {**raw.get("engine", {}), **ENGINE}
        raw["cluster"] = {"node_name": HEAD, "port": CLUSTER_PORT, "join_timeout_seconds": 300}
        paths[name] = out / f"deploy-{name}.yaml"
        paths[name].write_text(yaml.safe_dump(raw, sort_keys=False))
    return paths


def serving_config(path: Path, cluster: EmulatedCluster) -> Path:
    """The deployment file with the head's cluster address of this run (addresses change per run)."""
    raw = yaml.safe_load(path.read_text())
    raw["cluster"]["host"] = cluster.address(HEAD)
    served = path.with_name(path.stem + "-served.yaml")
    served.write_text(yaml.safe_dump(raw, sort_keys=False))
    return served


# --------------------------------------------------------------------------------- predicted and measured

def predict(cluster_path: Path, deploy_path: Path, rate: float, records: list[dict] | None, num_requests: int) -> dict:
    """The simulator on the load generator's own arrival times (and, once measured, each request's prompt
    and output token counts)."""
    cluster, config = load_cluster(cluster_path), load_config(deploy_path)
    model = load_model(MODEL)
    check_against_model(config, model.num_layers, model.num_heads, model.num_kv_heads)
    model = model.with_dtype(config.dtype)
    offsets = arrival_offsets(num_requests, rate, random.Random(SEED))
    lengths = ([(r["num_prompt_tokens"] or PROMPT_LEN, r["num_output_tokens"] or OUTPUT_LEN) for r in records]
               if records else [(PROMPT_LEN, OUTPUT_LEN)] * num_requests)
    requests = [Request(offset, p, o) for offset, (p, o) in zip(offsets, lengths)]
    spec = workload(rate, num_requests)
    costs = replica_costs(cluster, model, config, plan_from_config(config, cluster))
    predicted = simulate(costs, spec, requests, capacities=[saturated_throughput_rps(c, spec) for c in costs])
    return {"attainment": predicted.slo_attainment, "throughput_rps": predicted.throughput_rps,
            "ttft_p50_s": predicted.p50_ttft_s, "ttft_p99_s": predicted.p99_ttft_s,
            "tpot_p50_s": predicted.p50_tpot_s, "tpot_p99_s": predicted.p99_tpot_s}


def measured(report: dict) -> dict:
    """SLO attainment (end-to-end deadline; a failed request misses), throughput and latencies of one run."""
    records, summary = report["requests"], report["summary"]
    met = sum(1 for r in records if r["is_success"] and r["e2e"] <= SLO_SECONDS)
    return {"attainment": met / len(records), "throughput_rps": summary["request_throughput"],
            "ttft_p50_s": summary["ttft"]["median_ms"] / 1e3, "ttft_p99_s": summary["ttft"]["p99_ms"] / 1e3,
            "tpot_p50_s": summary["tpot"]["median_ms"] / 1e3, "tpot_p99_s": summary["tpot"]["p99_ms"] / 1e3,
            "num_failed": summary["num_failed"], "duration_s": summary["duration_s"]}


# ------------------------------------------------------------------------------------------------ the run

def run(setup: Setup, out: Path, log=print) -> dict:
    """Build the cluster, calibrate, plan, serve and drive every plan; the saved points."""
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    runs.mkdir(exist_ok=True)
    started = time.perf_counter()
    results = {"setup": {"rates": list(setup.rates), "seconds": setup.seconds, "slo_s": SLO_SECONDS,
                         "prompt_len": PROMPT_LEN, "output_len": OUTPUT_LEN, "plan_rate": PLAN_RATE,
                         "device_cores": DEVICE_CORES, "device_memory_gb": DEVICE_MEMORY_GB,
                         "bandwidth_mbit": {f"{a}-{b}": v for (a, b), v in BANDWIDTH_MBIT.items()},
                         "is_measured_calibration": setup.is_measured_calibration},
               "plans": {}, "complete": False}
    hosts = [HEAD, *DEVICE_CORES]
    with EmulatedCluster(hosts, sites=SITES, bandwidth_mbit=BANDWIDTH_MBIT, cpu_quota=DEVICE_CORES,
                         cpu_period_us=CPU_PERIOD_US) as cluster:
        cluster.set_cpu_quota(HEAD, None)  # a group of its own, weighted like the others, no limit
        agents = [start_agent(cluster, host, HEAD, CLUSTER_PORT, environment(), runs, "--num-cpus", "1",
                              "--memory-gb", str(DEVICE_MEMORY_GB[host])) for host in DEVICE_CORES]
        phase = time.perf_counter()
        if setup.is_measured_calibration:
            calibrated = calibrate_across_hosts(cluster, out)
            results["calibrated"] = {"links": calibrated["links"], "devices": device_summaries(out / "calibrated-devices")}
            topology = calibrated
        else:
            topology = shaped_links()
        cluster_path, results["speeds"] = calibrate(cluster, setup, out, "cluster", topology)
        results["calibration_s"] = round(time.perf_counter() - phase, 1)
        log(f"calibrated in {results['calibration_s']:.0f} s: {cluster_path}")
        phase = time.perf_counter()
        plans = make_plans(cluster_path, out, setup.plans)
        results["planning_s"] = round(time.perf_counter() - phase, 1)
        for i, (name, path) in enumerate(plans.items()):
            config = load_config(path)
            entry = {"label": LABELS[name], "shape": describe_shapes(plan_from_config(config, load_cluster(cluster_path))),
                     "layout": [[f"{s.devices[0]}:{s.layers}" for s in r.stages] for r in config.replicas],
                     "speeds": results["speeds"], "points": []}
            devices_now = cluster_path  # the devices as they run just before the plan is served
            if i > 0 and setup.is_measured_calibration:  # the machine's other load drifts: measure again
                devices_now, entry["speeds"] = calibrate(cluster, setup, out, f"cluster-before-{name}", topology)
            results["plans"][name] = entry
            log(f"{name}: {entry['layout']}")
            server = start_head(cluster, HEAD, serving_config(path, cluster), HTTP_PORT, environment(),
                                runs / f"head-{name}.log")
            try:
                entry["startup_s"] = round(wait_healthy(server, HTTP_PORT, timeout=600), 1)
                is_stopped = False
                for rate in setup.rates:
                    num = max(10, round(rate * setup.seconds))
                    point = {"rate": rate, "num_requests": num}
                    if not is_stopped:
                        report = bench_serve(cluster, HEAD, HTTP_PORT, rate=rate, num_prompts=num, input_len=PROMPT_LEN,
                                             output_len=OUTPUT_LEN, seed=SEED, json_path=runs / f"{name}-{rate:g}.json",
                                             env=environment(), timeout=setup.seconds * 6 + 300)
                        point["measured"] = measured(report)
                        point["predicted"] = predict(devices_now, path, rate, report["requests"], num)
                        is_stopped = point["measured"]["attainment"] < STOP_BELOW
                    else:
                        point["predicted"] = predict(devices_now, path, rate, None, num)
                    entry["points"].append(point)
                    log(f"  {name} at {rate:g} req/s: " + ", ".join(
                        f"{side} attainment {point[side]['attainment']:.2f} throughput {point[side]['throughput_rps']:.2f}"
                        for side in ("measured", "predicted") if side in point))
                    save(results, out, started)
            finally:
                server.stop()
        for agent in agents:
            agent.stop(timeout=10)
    results["complete"] = True
    save(results, out, started)
    return results


def calibrate(cluster: EmulatedCluster, setup: Setup, out: Path, stem: str, topology: dict) -> tuple[Path, dict[str, float]]:
    """The cluster file `out/STEM.yaml` of the devices as they run now on `topology`, and their speeds."""
    if setup.is_measured_calibration:
        speeds, how = measure_speeds(cluster, out, stem), "speed measured on its host"
    else:
        speeds, how = dict(DEVICE_CORES), "scaled by its CPU quota"
    reference = load_device_file(REFERENCE_DEVICE)
    devices = {host: scaled_device(reference, host, speeds[host], how) for host in DEVICE_CORES}
    path = out / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(cluster_file(devices, topology), sort_keys=False))
    return path, {host: round(v, 4) for host, v in speeds.items()}


def device_summaries(devices_dir: Path) -> dict:
    """`hexgen calibrate --nodes`' own device profiles, kept beside the speeds the experiment uses."""
    keys = ("memory_gb", "tflops", "mem_bandwidth_gbs", "overhead_ms_per_layer", "overhead_ms_per_step", "overhead_us_per_kv_token")
    return {path.stem: {k: getattr(device, k) for k in keys}
            for path in sorted(devices_dir.glob("*.yaml")) for device in [load_device_file(path)]}


def save(results: dict, out: Path, started: float) -> None:
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    (out / "emulated_cluster.json").write_text(json.dumps(results, indent=1))


# ------------------------------------------------------------------------------------------------- report

def errors(results: dict) -> dict:
    """Median absolute error of attainment, median relative error of throughput and TPOT p50, over every
    measured point."""
    points = [p for plan in results["plans"].values() for p in plan["points"] if "measured" in p]
    def relative(key):
        values = [abs(p["predicted"][key] - p["measured"][key]) / p["measured"][key] for p in points
                  if p["measured"][key] > 0 and math.isfinite(p["predicted"][key])]
        return statistics.median(values) if values else math.nan
    return {"attainment": statistics.median(abs(p["predicted"]["attainment"] - p["measured"]["attainment"])
                                            for p in points) if points else math.nan,
            "throughput": relative("throughput_rps"), "tpot_p50": relative("tpot_p50_s"), "num_points": len(points)}


def best_rates(results: dict) -> dict[str, dict]:
    """Per plan: the highest rate at TARGET attainment, measured and predicted (interpolated)."""
    rates = results["setup"]["rates"]
    best = {}
    for name, plan in results["plans"].items():
        sides = {}
        for side in ("measured", "predicted"):
            pts = [p for p in plan["points"] if side in p]
            attained = [p[side]["attainment"] for p in pts]
            if side == "measured" and len(pts) < len(rates):
                attained += [0.0] * (len(rates) - len(pts))  # not driven: it had already failed
            sides[side] = highest_rate(rates, attained) if attained else 0.0
        best[name] = sides
    return best


def report(results: dict) -> str:
    s = results["setup"]
    best, err = best_rates(results), errors(results)
    cores = ", ".join(f"{h} {c:g}" for h, c in s["device_cores"].items())
    memory = ", ".join(f"{h} {m:g} GB" for h, m in s["device_memory_gb"].items())
    lines = [
        f"SmolLM2-135M (fp32) on an emulated cluster: hosts head, a, b (site s1) and c (site s2) as network namespaces, "
        f"links {BANDWIDTH_MBIT[('s1', 's1')]:g} Mbit/s in a site and {BANDWIDTH_MBIT[('s1', 's2')]:g} Mbit/s across (tc htb); "
        f"one cpu device per host with a CPU quota (cores: {cores}) and a memory budget ({memory}). "
        f"Devices: this machine's calibration (configs/devices/local-cpu.yaml) at each host's speed "
        f"({', '.join(f'{h} {v:.3f}x' for h, v in results.get('speeds', {}).items())}), "
        f"{'measured on the host by timing the engine stage' if s['is_measured_calibration'] else 'its CPU quota'}; "
        f"links {'as `hexgen calibrate --nodes` measured them' if s['is_measured_calibration'] else 'as shaped'}; "
        f"plans for {s['plan_rate']:g} req/s. Workload: prompt {s['prompt_len']}, output {s['output_len']} tokens, Poisson arrivals, "
        f"{s['seconds']:g} s of arrivals per point, deadline {s['slo_s']:g} s end to end. `hexgen bench serve` against "
        f"`hexgen serve` across the hosts; predicted = the simulator on the same arrival times. Run time "
        f"{results.get('elapsed_s', 0) / 60:.1f} min (calibration {results.get('calibration_s', 0):.0f} s).", "",
        f"| plan | layout (device:layers per stage) | device speeds when served (a, b, c) | highest rate at {TARGET:.0%} attainment, measured (req/s) | predicted (req/s) | vs best symmetric, measured | predicted |",
        "|---|---|---|---|---|---|---|",
    ]
    symmetric = best.get("symmetric", {})
    for name, plan in results["plans"].items():
        ratios = [f"{best[name][side] / symmetric[side]:.2f}x" if symmetric.get(side) else "n/a"
                  for side in ("measured", "predicted")]
        layout = " + ".join("[" + ", ".join(stages) + "]" for stages in plan["layout"])
        speeds = ", ".join(f"{v:.3f}" for v in plan.get("speeds", {}).values())
        lines.append(f"| {plan['label']} | {layout} | {speeds} | {best[name]['measured']:.2f} | {best[name]['predicted']:.2f} | "
                     f"{ratios[0]} | {ratios[1]} |")
    lines += ["", f"Prediction against measurement over {err['num_points']} measured points: median absolute error of SLO "
              f"attainment {err['attainment']:.3f} (goal <= 0.10), median relative error of throughput "
              f"{err['throughput']:.1%} and of TPOT p50 {err['tpot_p50']:.1%} (goal <= 15%).", "",
              "| plan | rate (req/s) | SLO attainment | throughput (req/s) | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (ms) | TPOT p99 (ms) | failed |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, plan in results["plans"].items():
        for p in plan["points"]:
            m, q = p.get("measured"), p["predicted"]
            def pair(key, scale=1.0, fmt=".2f"):
                predicted = f"{q[key] * scale:{fmt}}" if math.isfinite(q[key]) else "inf"
                return f"{m[key] * scale:{fmt}} ({predicted})" if m else f"- ({predicted})"
            lines.append(f"| {name} | {p['rate']:g} | {pair('attainment')} | {pair('throughput_rps')} | {pair('ttft_p50_s')} | "
                         f"{pair('ttft_p99_s')} | {pair('tpot_p50_s', 1e3, '.0f')} | {pair('tpot_p99_s', 1e3, '.0f')} | "
                         f"{m['num_failed'] if m else '-'} |")
    lines += ["", "Each cell: measured (predicted). '-': not driven, the plan's measured attainment had fallen below "
              f"{STOP_BELOW:g} at a lower rate.", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    for i, (name, plan) in enumerate(results["plans"].items()):
        color = f"C{i}"
        pts = [p for p in plan["points"] if "measured" in p]
        axis.plot([p["rate"] for p in pts], [p["measured"]["attainment"] for p in pts], "-o", color=color,
                  label=f"{name}, measured")
        axis.plot([p["rate"] for p in plan["points"]], [p["predicted"]["attainment"] for p in plan["points"]], "--x",
                  color=color, label=f"{name}, predicted")
    s = results["setup"]
    axis.axhline(TARGET, color="grey", linewidth=0.8, linestyle=":")
    axis.set(xlabel="request rate (req/s)", ylabel=f"SLO attainment (deadline {s['slo_s']:g} s)", ylim=(-0.02, 1.02),
             title=f"SmolLM2-135M on an emulated heterogeneous cluster (cores {', '.join(f'{c:g}' for c in s['device_cores'].values())})")
    axis.title.set_fontsize(10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out: Path) -> str:
    text = report(results)
    (out / "emulated_cluster.md").write_text(text)
    plot(results, out / "emulated_cluster.png")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS / "emulated_cluster"))
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    parser.add_argument("--seconds", type=float, default=SECONDS, help="of arrivals per point")
    parser.add_argument("--plans", nargs="+", choices=PLANS, default=list(PLANS))
    parser.add_argument("--scaled-calibration", action="store_true",
                        help="each host's speed = its CPU quota, instead of measuring it on the host")
    parser.add_argument("--report", action="store_true", help="only write the table and plot from the saved points")
    parser.add_argument("--time-stage-here", metavar="FILE", help=argparse.SUPPRESS)  # run inside each host
    args = parser.parse_args()
    if args.time_stage_here:
        time_stage_here(Path(args.time_stage_here))
        return
    out = Path(args.out)
    if not args.report:
        setup = Setup(tuple(args.rates), args.seconds, tuple(args.plans), not args.scaled_calibration)
        run(setup, out, log=lambda line: print(line, flush=True))
    print(write_report(json.loads((out / "emulated_cluster.json").read_text()), out))
    print(f"wrote {out / 'emulated_cluster.md'} and {out / 'emulated_cluster.png'}")


if __name__ == "__main__":
    main()
