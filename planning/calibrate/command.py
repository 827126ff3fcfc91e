"""`hexgen calibrate`: measure this machine as the planner sees a device and a link, and write a
device spec file (planning/inputs/catalog.py) that a cluster file can name under `gpus:` and `links:`.

The device is one worker process at `--threads-per-worker` torch threads: its dense matmul
throughput, its weight-scan memory bandwidth, its share of RAM, and the overheads (per layer, per KV
token read, per step) that the cost model leaves unexplained on the engine's own stage
(planning/calibrate/engine.py). The link is gloo between worker processes on this machine, with the
all-reduce latency per TP degree measured. Every other thread count and worker count measured is
kept as a comment in the file.

With --nodes and the node agents up, `hexgen calibrate` measures a cluster instead: each node as one
device (in a job on its host, at its cores' threads), gloo point-to-point between every pair of nodes,
and writes the cluster file `hexgen plan --cluster` reads (planning/calibrate/cluster.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from planning.calibrate.device import DTYPES, ComputeMeasurement, LayerBench, measure_compute
from planning.calibrate.engine import (QUICK_SHAPES, SHAPES, OverheadFit, StageTiming, faster_than_memory, fit_overheads,
                                      time_engine_stage)
from planning.calibrate.links import LinkMeasurement, measure_links
from planning.calibrate.tp import TPGroupFit, fit_tp_allreduce_latency
from planning.cost.stage_cost import StageCost
from planning.inputs.catalog import DeviceFile, DeviceSpec, LinkSpec
from hexcore.cluster.head_options import FLAGS, add_head_arguments, given_cluster_fields
from hexcore.model.files import resolve_model_dir
from planning.inputs.models import BUILTIN_MODELS, ModelSpec

DEFAULT_OUTPUT = "configs/devices/local-cpu.yaml"
MODEL_NAME = "smollm2-135m"  # the layer whose overhead is fitted: the default model's
DECODE_CONTEXT_LEN = 128
PREFILL_LEN = 128


@dataclass(frozen=True)
class Budget:
    """How much to measure; `QUICK` keeps a run under ~10 s, `FULL` under ~60 s on 2 cores."""

    matmul_size: int
    scan_bytes: int
    layer_flush_bytes: int
    num_compute_reps: int
    num_layer_reps: int
    decode_batch_sizes: tuple[int, ...]
    link_sizes: tuple[int, ...]
    num_link_reps: int
    link_worker_counts: tuple[int, ...]
    is_thread_sweep: bool  # also powers of two up to the core count, not only --threads-per-worker
    engine_shapes: tuple  # steps timed on the engine's own stage (calibrate_engine.StepShape)
    engine_layer_counts: tuple[int, ...]
    num_engine_reps: int


FULL = Budget(
    matmul_size=1024,
    scan_bytes=256 << 20,
    layer_flush_bytes=128 << 20,
    num_compute_reps=10,
    num_layer_reps=30,
    decode_batch_sizes=(1, 4, 16),
    link_sizes=(4 << 10, 64 << 10, 1 << 20, 4 << 20, 8 << 20),
    num_link_reps=30,
    link_worker_counts=(2, 3),
    is_thread_sweep=True,
    engine_shapes=SHAPES,
    engine_layer_counts=(30, 10),
    num_engine_reps=10,
)
QUICK = dataclasses.replace(  # smaller and fewer of everything
    FULL,
    matmul_size=512, scan_bytes=32 << 20, layer_flush_bytes=32 << 20, num_compute_reps=3, num_layer_reps=10,
    decode_batch_sizes=(1,),
    link_sizes=(4 << 10, 4 << 20, 16 << 20),  # wide enough that transfer time beats gloo latency noise
    num_link_reps=10, link_worker_counts=(2,), is_thread_sweep=False,
    engine_shapes=QUICK_SHAPES, engine_layer_counts=(4, 2), num_engine_reps=2,
)


@dataclass(frozen=True)
class LayerCheck:
    """One measured layer configuration beside the cost model's roofline for it (no overhead)."""

    label: str
    measured_s: float
    spread: float
    roofline_s: float


@dataclass(frozen=True)
class Calibration:
    dtype: str
    num_threads: int  # per worker, the figures the device spec carries
    memory_gb: float
    compute: tuple[ComputeMeasurement, ...]  # one per thread count measured
    layers: tuple[LayerCheck, ...]  # at `num_threads`; the first is decode at batch 1
    links: tuple[LinkMeasurement, ...]  # one per worker count
    engine: tuple[StageTiming, ...] = ()  # the engine's own stage
    overheads: OverheadFit | None = None  # fitted to `engine`
    tp_groups: tuple[TPGroupFit, ...] = ()  # all-reduce latency inside the engine's TP stages

    @property
    def device_compute(self) -> ComputeMeasurement:
        return next(c for c in self.compute if c.num_threads == self.num_threads)

    @property
    def overhead_ms_per_layer(self) -> float:
        """Decode at batch 1, measured minus roofline: what a layer costs beyond its weight scan."""
        decode = self.layers[0]
        return max(0.0, decode.measured_s - decode.roofline_s) * 1e3

    def device_file(self, name: str) -> DeviceFile:
        compute = self.device_compute
        fit = self.overheads or OverheadFit(compute.tflops, self.overhead_ms_per_layer, 0.0, 0.0)
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        return DeviceFile(
            name=name,
            kind="cpu",
            memory_gb=round(self.memory_gb, 2),
            tflops=round(fit.tflops, 4),
            mem_bandwidth_gbs=round(compute.mem_bandwidth_gbs, 2),
            overhead_ms_per_layer=round(fit.ms_per_layer, 4),
            overhead_ms_per_step=round(fit.ms_per_step, 4),
            overhead_us_per_kv_token=round(fit.us_per_kv_token, 4),
            source=f"hexgen calibrate, {date}, {os.cpu_count()} cores, {self.num_threads} thread(s) per worker, {self.dtype}",
            link=self._worker_link(),
        )

    def _worker_link(self) -> LinkSpec | None:
        """The link between workers on this machine, if measured."""
        if not self.links:
            return None
        pair = self.links[0]  # two workers: the link the planner's alpha-beta model describes
        return LinkSpec(
            bandwidth_gbps=round(pair.p2p.bytes_per_second * 8 / 1e9, 3),
            latency_ms=round(pair.p2p.latency_s * 1e3, 4),
            allreduce_latency_ms=round(pair.all_reduce.latency_s * 1e3, 4),
            allreduce_latency_ms_by_tp={link.num_workers: round(link.all_reduce.latency_s * 1e3, 4)
                                        for link in self.links}
            | {fit.tp: round(fit.allreduce_latency_s * 1e3, 4) for fit in self.tp_groups},
        )


def calibrate(dtype: str, num_threads: int, budget: Budget, log=lambda line: None) -> Calibration:
    """Run every measurement of `budget` on this machine."""
    num_cores = os.cpu_count() or 1
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    if not 1 <= num_threads <= num_cores:
        raise ValueError(f"--threads-per-worker must be between 1 and {num_cores} (this machine's cores), got {num_threads}")
    links = []  # first: the workers are forked, best before this process starts its thread pools
    for num_workers in budget.link_worker_counts:
        links.append(measure_links(num_workers, list(budget.link_sizes), budget.num_link_reps))
        log(f"gloo, {num_workers} workers: p2p {_alpha_beta(links[-1].p2p)}, all-reduce {_alpha_beta(links[-1].all_reduce)}")
    thread_counts = [num_threads]
    if budget.is_thread_sweep:
        powers_of_two = (1 << k for k in range(num_cores.bit_length()))
        thread_counts = sorted({num_threads, num_cores, *(n for n in powers_of_two if n <= num_cores)})
    memory_gb = _total_memory_bytes() / 1e9 / (num_cores // num_threads)
    calibration = measure_device(dtype, num_threads, memory_gb, budget, thread_counts, log)
    calibration = dataclasses.replace(calibration, links=tuple(links))
    if num_threads != 1:  # the TP stages measured run single-thread workers, as the fidelity check does
        return calibration
    model = BUILTIN_MODELS[MODEL_NAME].with_dtype(dtype)
    tp_groups = []
    for tp in budget.link_worker_counts:
        if tp > 1 and model.num_heads % tp == 0 and model.num_kv_heads % tp == 0:
            tp_groups.append(fit_tp_allreduce_latency(calibration.device_file("calibrating"), tp, model.num_layers, dtype))
            log(f"engine TP {tp} stage: all-reduce {tp_groups[-1].allreduce_latency_s * 1e3:.3f} ms per call")
    return dataclasses.replace(calibration, tp_groups=tuple(tp_groups))


def measure_device(dtype: str, num_threads: int, memory_gb: float, budget: Budget, thread_counts=None,
                   log=lambda line: None) -> Calibration:
    """One worker of `num_threads` torch threads as a device (no links): compute and weight-scan rates
    at each of `thread_counts` (default: only `num_threads`), one layer against its roofline, and the
    engine's own stage with the overheads fitted to it."""
    compute = []
    for threads in thread_counts or [num_threads]:
        compute.append(measure_compute(dtype, threads, budget.matmul_size, budget.scan_bytes, budget.num_compute_reps))
        log(f"compute, {threads} thread(s): {compute[-1].tflops * 1e3:.1f} GFLOPS, {compute[-1].mem_bandwidth_gbs:.1f} GB/s")
    device_compute = next(c for c in compute if c.num_threads == num_threads)
    model = BUILTIN_MODELS[MODEL_NAME].with_dtype(dtype)
    layers = _check_layers(model, dtype, num_threads, device_compute, budget)
    for check in layers:
        log(f"{check.label}: {check.measured_s * 1e3:.3f} ms measured, {check.roofline_s * 1e3:.3f} ms roofline")
    engine = time_engine_stage(resolve_model_dir("default"), dtype, num_threads, budget.engine_shapes,
                               budget.num_engine_reps, budget.engine_layer_counts)
    device = DeviceSpec(memory_gb=memory_gb, tflops=device_compute.tflops,
                        mem_bandwidth_gbs=device_compute.mem_bandwidth_gbs, kind="cpu")
    overheads = fit_overheads(engine, model, device)
    log(f"engine stage overheads: {overheads}")
    for t in faster_than_memory(engine, model, device):
        log(f"warning: {t.num_layers} layers, {t.shape.label} took {t.median_s * 1e3:.2f} ms, less than its memory "
            f"time at {device.mem_bandwidth_gbs:.1f} GB/s: the bandwidth measured low (a busy machine?); re-run")
    return Calibration(dtype, num_threads, memory_gb, tuple(compute), tuple(layers), (), tuple(engine), overheads)


def _check_layers(model: ModelSpec, dtype: str, num_threads: int, compute: ComputeMeasurement, budget: Budget) -> list[LayerCheck]:
    """Time decode steps at each batch size and one prefill, beside the planner's roofline for them."""
    device = DeviceSpec(memory_gb=1, tflops=compute.tflops, mem_bandwidth_gbs=compute.mem_bandwidth_gbs, kind="cpu")
    link = LinkSpec(bandwidth_gbps=1, latency_ms=0)  # unused at TP 1
    stage = StageCost(model, device, tp=1, tp_link=link, is_first=False, is_last=False)
    assert budget.decode_batch_sizes[0] == 1, "the overhead fit reads decode at batch 1 first"
    bench = LayerBench(model, dtype, budget.layer_flush_bytes)
    checks = []
    for batch in budget.decode_batch_sizes:
        timing = bench.time(num_threads, batch, 1, DECODE_CONTEXT_LEN, budget.num_layer_reps)
        roofline = stage.decode_time(1, batch, DECODE_CONTEXT_LEN)
        checks.append(LayerCheck(f"decode, batch {batch}, context {DECODE_CONTEXT_LEN}", timing.best_s, timing.spread, roofline))
    timing = bench.time(num_threads, 1, PREFILL_LEN, 0, max(3, budget.num_layer_reps // 5))
    checks.append(LayerCheck(f"prefill, {PREFILL_LEN} tokens", timing.best_s, timing.spread, stage.prefill_time(1, PREFILL_LEN)))
    return checks


def _total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _alpha_beta(fit) -> str:
    return f"{fit.latency_s * 1e3:.3f} ms + bytes / {fit.bytes_per_second / 1e9:.2f} GB/s"


def render(calibration: Calibration, name: str, command: str | None = None,
           memory_note: str = "RAM / (cores / threads per worker)") -> str:
    """The device spec as YAML, headed by comments with everything measured (`command`: what ran it)."""
    c = calibration
    command = command or f"hexgen calibrate --dtype {c.dtype} --threads-per-worker {c.num_threads}"
    lines = [
        f"# `{command}` on {platform.node()}:",
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.2f} at the end (other processes slow every figure).",
        "# Compute per worker (fastest of the repetitions; spread = (slowest - fastest) / fastest):",
    ]
    for m in c.compute:
        lines.append(
            f"#   {m.num_threads} thread(s): matmul {m.tflops * 1e3:.1f} GFLOPS (spread {m.tflops_spread:.0%}), "
            f"weight scan {m.mem_bandwidth_gbs:.1f} GB/s (spread {m.mem_bandwidth_spread:.0%})"
        )
    lines.append(f"# One {MODEL_NAME} layer at {c.num_threads} thread(s), measured vs the cost model without overheads:")
    for check in c.layers:
        lines.append(
            f"#   {check.label}: {check.measured_s * 1e3:.3f} ms (spread {check.spread:.0%}) vs "
            f"{check.roofline_s * 1e3:.3f} ms, ratio {check.measured_s / check.roofline_s:.2f}"
        )
    lines.append("#   (the cost model without its overheads: the roofline, see planning/cost/stage_cost.py)")
    if c.engine:
        lines.append("# The engine's own stage (hexcore StageRunner, embedding + N layers + LM head + sampling), "
                     "median of the repetitions:")
        model = BUILTIN_MODELS[MODEL_NAME].with_dtype(c.dtype)
        fitted = StageCost(model, c.device_file(name).device(), 1, LinkSpec(bandwidth_gbps=1, latency_ms=0), True, True)
        for t in c.engine:
            lines.append(f"#   {t.num_layers} layers, {t.shape.label}: {t.median_s * 1e3:.2f} ms (spread {t.spread:.0%}), "
                         f"fitted model {t.shape.step_time(fitted, t.num_layers) * 1e3:.2f} ms")
        lines.append("#   tflops (the engine's effective compute), overhead_ms_per_layer, overhead_us_per_kv_token, "
                     "overhead_ms_per_step:")
        lines.append("#   fitted to these under the roofline (planning/calibrate/engine.py).")
    if c.links:
        lines.append("# gloo between worker processes (1 thread each), alpha-beta fits of the mean time per call:")
    for link in c.links:
        lines.append(f"#   {link.num_workers} workers: p2p {_alpha_beta(link.p2p)}; all-reduce {_alpha_beta(link.all_reduce)}")
        sizes = ", ".join(f"{size >> 10} KiB" for size in link.sizes)
        lines.append(f"#     sizes {sizes}: p2p {_ms_list(link.p2p_s)} ms; all-reduce {_ms_list(link.all_reduce_s)} ms")
    for fit in c.tp_groups:
        lines.append(f"# The engine's own TP {fit.tp} stage ({fit.num_layers} layers, {fit.num_steps} steps of a short trace): "
                     f"all-reduce {fit.allreduce_latency_s * 1e3:.3f} ms per call (10th-90th percentile "
                     f"{fit.spread_s[0] * 1e3:.3f}-{fit.spread_s[1] * 1e3:.3f} ms) replaces the loop's figure for TP {fit.tp}")
        lines.append("#   (step time minus the cost model's time without all-reduce latency, over 2 * layers calls; "
                     "planning/calibrate/tp.py)")
    lines.append(("# `link:` is the 2-worker fit; " if c.links else "# ") + f"memory_gb is {memory_note}.")
    spec = calibration.device_file(name).model_dump(exclude_none=True)
    spec = {"name": spec.pop("name"), **spec}
    return "\n".join(lines) + "\n" + yaml.safe_dump(spec, sort_keys=False, width=200)


def _ms_list(seconds: tuple[float, ...]) -> str:
    return " ".join(f"{s * 1e3:.3f}" for s in seconds)


def run(args: argparse.Namespace) -> int:
    if args.nodes is not None:
        return run_across_hosts(args)
    given = [FLAGS[field] for field in given_cluster_fields(args)] + (["--one-at-a-time"] if args.one_at_a_time else [])
    if given:
        raise ValueError(f"{', '.join(given)}: only with --nodes (calibrating a cluster)")
    budget = QUICK if args.quick else FULL
    threads = 1 if args.threads_per_worker is None else args.threads_per_worker
    calibration = calibrate(args.dtype, threads, budget, log=lambda line: print(line, file=sys.stderr, flush=True))
    output = Path(args.output or DEFAULT_OUTPUT)
    output.parent.mkdir(parents=True, exist_ok=True)
    text = render(calibration, args.name or output.stem)
    output.write_text(text)
    print(text, end="")
    print(f"wrote {output}")
    return 0


def run_across_hosts(args: argparse.Namespace) -> int:
    from hexcore.config import ClusterSpec, validate_spec
    from hexcore.cluster.jobs import JobFailed
    from planning.calibrate import cluster

    for flag, value in (("--threads-per-worker", args.threads_per_worker), ("--name", args.name)):
        if value is not None:
            raise ValueError(f"{flag} is for one machine; with --nodes each node is one device at its own cores "
                             "(`hexgen node --num-cpus`) named NODE-cpu")
    head = validate_spec(given_cluster_fields(args), ClusterSpec, "cluster options")
    nodes = [node.strip() for node in args.nodes.split(",") if node.strip()]
    try:
        output = cluster.calibrate_cluster(nodes, args.output or cluster.DEFAULT_OUTPUT, head, dtype=args.dtype,
                                           is_quick=args.quick, is_one_at_a_time=args.one_at_a_time)
    except JobFailed as err:
        print(f"hexgen calibrate: error: {err}", file=sys.stderr)
        return 1
    print("\n".join(cluster.summary(output)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("calibrate", help="measure this machine (or, with --nodes, a cluster) for the planner",
                                   description=__doc__)
    parser.add_argument("-o", "--output", default=None,
                        help=f"device spec file to write (default {DEFAULT_OUTPUT}); with --nodes, the cluster file "
                             "(default configs/clusters/calibrated.yaml), its device files in STEM-devices/ beside it")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype in use (default float32)")
    parser.add_argument("--threads-per-worker", type=int, default=None, help="torch threads of one worker (default 1)")
    parser.add_argument("--name", default=None, help="device name in the file (default: the file's stem)")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller measurements (~10 s, for tests)")
    across = parser.add_argument_group("across hosts (agents up: `hexgen node --head HOST:PORT --name NODE` on each)")
    across.add_argument("--nodes", metavar="NODE,NODE,...",
                        help="measure these nodes (the head's own --node-name may be one) and every pair of them, "
                             "and write a cluster file for `hexgen plan --cluster`")
    add_head_arguments(across)
    across.add_argument("--one-at-a-time", action="store_true",
                        help="profile one node at a time (for hosts emulated on one machine, which share its cores)")
    parser.set_defaults(func=run)
