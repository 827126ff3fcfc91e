"""`hexgen calibrate --nodes a,b,...`: measure a cluster of hosts with their agents up, and write the
cluster file `hexgen plan --cluster` reads (calibrate -> plan -> serve across hosts).

1. The head opens the cluster port (the options of `hexgen serve`) and waits for the named agents, as
   serve does; the head's own node (`node_name`) may be one of the nodes.
2. Each node measures itself as one device, in a job on its own host (node_jobs.py): a worker at torch
   threads = the node's cores, memory = the node's memory (HostInfo.num_cores and memory_bytes, as its
   agent reports them), with planning/calibrate/command.py's measurements. All nodes at once, since
   they are separate machines, or one at a time (hosts emulated on one machine share its cores).
3. Then every pair of nodes, one pair at a time (a node's NIC and cores serve all its pairs): gloo
   point-to-point between one process on each host, meeting at a c10d store on the head (pair.py).
4. The cluster file: each node its own site with one device of its own type, whose spec file is written
   to `STEM-devices/NODE.yaml` beside it; one link override per pair; inter_site is the slowest pair.
"""

from __future__ import annotations

import datetime
import itertools
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from hexcore import config
from planning.calibrate.node_jobs import (FULL_LINK, QUICK_LINK, DeviceProfile, DeviceProfileJob, LinkBudget,
                                         LinkEndpointJob)
from planning.calibrate.pair import PairTiming
from planning.inputs.catalog import LinkSpec
from planning.inputs.cluster import load_cluster

DEFAULT_OUTPUT = "configs/clusters/calibrated.yaml"
DEVICE_TIMEOUT_SECONDS = {True: 600.0, False: 1800.0}  # by is_quick
LINK_TIMEOUT_SECONDS = 300.0
NUM_LINK_ATTEMPTS = 3  # per pair, while its time does not grow with message size
_NODE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")  # as the cluster file's node names


@dataclass(frozen=True)
class MeasuredPair:
    nodes: tuple[str, str]
    timing: PairTiming

    @property
    def link(self) -> LinkSpec:
        try:
            fit = self.timing.fit
        except ValueError as err:
            raise ValueError(f"link {self.nodes[0]} <-> {self.nodes[1]}: {err}") from None
        return LinkSpec(bandwidth_gbps=_round(fit.bytes_per_second * 8 / 1e9), latency_ms=_round(fit.latency_s * 1e3))


def calibrate_cluster(nodes: Sequence[str], output: str | Path = DEFAULT_OUTPUT,
                      head: config.ClusterSpec = config.ClusterSpec(), *, dtype: str = "float32",
                      is_quick: bool = False, is_one_at_a_time: bool = False,
                      log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> Path:
    """Measure `nodes` (their agents joining `head`'s cluster port) and write the cluster file `output`
    and its device spec files; returns `output`. ValueError for bad arguments or nodes that do not join,
    JobFailed (hexcore/cluster/jobs.py) for a measurement that fails."""
    from hexcore.cluster.channel import load_token
    from hexcore.cluster.head import ClusterHead
    from hexcore.cluster.host import this_host
    from hexcore.cluster.jobs import run_here
    from hexcore.hardware import HostBudget
    from planning.calibrate.device import DTYPES

    _check_nodes(nodes)
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    remote = [node for node in nodes if node != head.node_name]
    cluster_head = None
    if remote:
        cluster_head = ClusterHead(head.node_name, head.host, head.port, load_token(head.token_file), needs={})
    try:
        if cluster_head is not None:
            log(f"cluster port {cluster_head.address}: waiting for {', '.join(remote)}")
            cluster_head.wait_for_nodes(remote, head.join_timeout_seconds)
            log(f"{', '.join(remote)} joined")

        def run_job(node: str, job: object, timeout: float) -> object:
            return run_here(job, timeout) if node == head.node_name else cluster_head.run_job(node, job, timeout)

        here = this_host(HostBudget.of_this_host(head.num_cpus, head.memory_gb))  # the head's own node, if measured
        hosts = {node: here if node == head.node_name else cluster_head.node_host(node) for node in nodes}
        command = _command(nodes, dtype, is_quick)
        jobs = {node: DeviceProfileJob(_device_name(node), command, dtype, host.num_cores,
                                       host.memory_bytes / 1e9, is_quick)  # one device per node: its cpu
                for node, host in hosts.items()}
        profiles = _profile_devices(jobs, run_job, is_quick, is_one_at_a_time, log)
        pairs = _measure_links(nodes, run_job, head.host, QUICK_LINK if is_quick else FULL_LINK, log)
    finally:
        if cluster_head is not None:
            cluster_head.close()
    return write_cluster_file(output, {node: profile.text for node, profile in profiles.items()}, pairs,
                              header=[f"`{command}`, {_today()}"])


def _profile_devices(jobs: dict[str, DeviceProfileJob], run_job, is_quick: bool, is_one_at_a_time: bool,
                     log) -> dict[str, DeviceProfile]:
    log(f"device profiles ({'one node at a time' if is_one_at_a_time else 'every node at once'}): "
        + ", ".join(f"{node} at {job.num_threads} thread(s), {job.memory_gb:.1f} GB" for node, job in jobs.items()))
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=1 if is_one_at_a_time else len(jobs)) as pool:
        futures = {node: pool.submit(run_job, node, job, DEVICE_TIMEOUT_SECONDS[is_quick]) for node, job in jobs.items()}
        profiles = {node: future.result() for node, future in futures.items()}
    log(f"device profiles measured in {time.monotonic() - started:.1f} s")
    return profiles


def _measure_links(nodes: Sequence[str], run_job, store_host: str, budget: LinkBudget, log) -> list[MeasuredPair]:
    """Every pair of nodes, one pair at a time, each again while its time does not grow with message size
    (a stall on a busy host)."""
    from hexcore.executor.rendezvous import Rendezvous

    if len(nodes) < 2:
        return []
    rendezvous, pairs, started = Rendezvous(store_host), [], time.monotonic()
    try:
        for a, b in itertools.combinations(nodes, 2):
            for attempt in range(1, NUM_LINK_ATTEMPTS + 1):
                pair = _measure_pair(a, b, run_job, rendezvous, budget)
                try:
                    log(f"link {a} <-> {b}: {_describe_link(pair.link)}")
                    break
                except ValueError as err:
                    if attempt == NUM_LINK_ATTEMPTS:
                        raise ValueError(f"{err}, {attempt} times; re-run on a quieter machine") from None
                    log(f"{err}; measuring it again")
            pairs.append(pair)
    finally:
        rendezvous.close()
    log(f"links measured in {time.monotonic() - started:.1f} s")
    return pairs


def _measure_pair(a: str, b: str, run_job, rendezvous, budget: LinkBudget) -> MeasuredPair:
    prefix = rendezvous.new_prefix(f"link-{a}-{b}")
    ends = [LinkEndpointJob(rendezvous.address, prefix, rank, budget) for rank in (0, 1)]
    with ThreadPoolExecutor(max_workers=2) as pool:  # both ends at once; rank 0 answers with the timings
        futures = [pool.submit(run_job, node, end, LINK_TIMEOUT_SECONDS) for node, end in zip((a, b), ends)]
        timing, _ = (future.result() for future in futures)
    return MeasuredPair((a, b), timing)


def write_cluster_file(output: str | Path, device_texts: dict[str, str], pairs: Sequence[MeasuredPair],
                       header: Sequence[str] = ()) -> Path:
    """The cluster file for nodes with these device spec files (by node) and measured pairs; checks
    that the planner reads it back. Returns `output`."""
    output = Path(output)
    devices_dir = output.parent / f"{output.stem}-devices"
    devices_dir.mkdir(parents=True, exist_ok=True)
    for node, text in device_texts.items():
        (devices_dir / f"{node}.yaml").write_text(text)
    raw: dict = {
        "gpus": {_device_name(node): f"{devices_dir.name}/{node}.yaml" for node in device_texts},
        "nodes": [{"name": node, "site": node, "gpu": _device_name(node), "count": 1} for node in device_texts],
    }
    if pairs:
        slowest = min(pairs, key=lambda pair: pair.link.bytes_per_second).link
        raw["links"] = {
            "inter_site": slowest.model_dump(exclude_none=True),
            "overrides": [{"sites": list(pair.nodes), **pair.link.model_dump(exclude_none=True)} for pair in pairs],
        }
    lines = [f"# {line}" for line in header]
    lines.append("# Each node is its own site and one device (a worker at its cores' threads); its measured spec")
    lines.append(f"# is {devices_dir.name}/NODE.yaml.")
    if pairs:
        lines.append("# Links: gloo point-to-point between the nodes, one process on each; one-way time per message")
        lines.append("# size (half a ping-pong: the mean of both directions), and the alpha-beta fit:")
    for pair in pairs:
        timing = pair.timing
        sizes = ", ".join(f"{size >> 10} KiB: {seconds * 1e3:.3f} ms" for size, seconds in zip(timing.sizes, timing.one_way_s))
        lines.append(f"#   {pair.nodes[0]} <-> {pair.nodes[1]}: {_describe_link(pair.link)} ({sizes})")
    if pairs:
        lines.append("# inter_site is the slowest pair (every pair has its override).")
    output.write_text("\n".join(lines) + "\n" + yaml.safe_dump(raw, sort_keys=False, width=200))
    load_cluster(output)  # the planner reads it
    return output


def summary(path: str | Path) -> list[str]:
    """A short human summary of a calibrated cluster file: each node's device, each pair's link."""
    cluster = load_cluster(path)
    lines = [f"wrote {path}: {len(cluster.nodes)} node(s)"]
    for node in cluster.nodes:
        d = node.device
        lines.append(f"  {node.name}: {d.memory_gb:.1f} GB, {d.tflops * 1e3:.1f} GFLOPS, {d.mem_bandwidth_gbs:.1f} GB/s, "
                     f"overheads {d.overhead_ms_per_step:.2f} ms/step + {d.overhead_ms_per_layer:.3f} ms/layer")
    for a, b in itertools.combinations(cluster.nodes, 2):
        lines.append(f"  {a.name} <-> {b.name}: {_describe_link(cluster.link(a.index, b.index))}")
    return lines


def _check_nodes(nodes: Sequence[str]) -> None:
    if not nodes:
        raise ValueError("--nodes: name at least one node")
    bad = [node for node in nodes if not _NODE_NAME.match(node)]
    if bad:
        raise ValueError(f"--nodes: bad node names {bad} (letters, digits, '_', '.', '-')")
    duplicates = sorted({node for node in nodes if list(nodes).count(node) > 1})
    if duplicates:
        raise ValueError(f"--nodes: {', '.join(duplicates)} named more than once")


def _device_name(node: str) -> str:
    return f"{node}-cpu"


def _command(nodes: Sequence[str], dtype: str, is_quick: bool) -> str:
    return f"hexgen calibrate --nodes {','.join(nodes)} --dtype {dtype}" + (" --quick" if is_quick else "")


def _describe_link(link: LinkSpec) -> str:
    rate = f"{link.bandwidth_gbps:.3g} Gbit/s" if link.bandwidth_gbps >= 1 else f"{link.bandwidth_gbps * 1e3:.3g} Mbit/s"
    return f"{rate}, latency {link.latency_ms:.3f} ms"


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def _today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
