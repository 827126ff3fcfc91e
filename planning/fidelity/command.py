"""`hexgen fidelity`: run the fidelity check (planning/fidelity/check.py), print the table, save JSON and a plot."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from planning.inputs.catalog import load_device_file
from planning.fidelity.check import (DEPLOYMENTS, Row, as_planned, compare, deployment_config, markdown_table, predicted_costs,
                               rows_of)
from planning.inputs.workload import WorkloadSpec, make_requests

DEFAULT_PLOT = "planning/experiments/results/fidelity.png"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("fidelity", help="compare the cost model and simulator with the real engine")
    parser.add_argument("--device", default="configs/devices/local-cpu.yaml",
                        help="device spec file written by `hexgen calibrate` (default: %(default)s)")
    parser.add_argument("--deployments", default=",".join(DEPLOYMENTS),
                        help="comma-separated names (default: all of %(default)s)")
    parser.add_argument("--num-requests", type=int, default=24, help="requests in the trace (default 24)")
    parser.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate, requests/s (default 2)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request (default 64)")
    parser.add_argument("--output-len", type=int, default=32, help="output tokens per request (default 32)")
    parser.add_argument("--runs", type=int, default=2, help="engine runs per deployment (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrivals and prompts (default 0)")
    parser.add_argument("--json", help="write every row as JSON to this file")
    parser.add_argument("--plot", default=DEFAULT_PLOT, help="PNG of predicted vs measured (default: %(default)s)")
    parser.set_defaults(func=run_fidelity)


def run_fidelity(args: argparse.Namespace) -> int:
    from planning.fidelity.replay import run_trace

    if args.runs < 1 or args.num_requests < 1:
        raise ValueError("--runs and --num-requests must be >= 1")
    names = [name.strip() for name in args.deployments.split(",") if name.strip()]
    configs = {name: deployment_config(name) for name in names}
    device_file = load_device_file(args.device)
    workload = WorkloadSpec(rate=args.rate, prompt_len=args.prompt_len, output_len=args.output_len,
                            slo_seconds=1e9, num_requests=args.num_requests, seed=args.seed)
    requests = make_requests(workload)
    rows: list[Row] = []
    loads = []
    for name, config in configs.items():
        costs = predicted_costs(config, device_file)
        config = as_planned(config, costs, workload)
        predicted, measured = [], []
        for run in range(args.runs):
            measurement = run_trace(config, requests, seed=args.seed + run)
            p, m = compare(costs, config, requests, measurement)
            predicted.append(p)
            measured.append(m)
            loads.append(measurement.load_average)
            print(f"{name} run {run + 1}: {len(measurement.steps)} steps, load average {measurement.load_average:.2f}",
                  file=sys.stderr)
        rows += rows_of(name, predicted, measured)
    print(markdown_table(rows))
    print(f"\nload average (1 min) at the end of each run: {', '.join(f'{x:.2f}' for x in loads)}; "
          f"{os.cpu_count()} cores, 1 thread per worker")
    if args.json:
        Path(args.json).write_text(json.dumps([{**row.__dict__, "ratio": row.ratio} for row in rows], indent=1))
    if args.plot:
        from planning.fidelity.plot import plot_rows

        plot_rows(rows, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0
