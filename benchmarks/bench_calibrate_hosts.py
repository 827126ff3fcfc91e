"""`hexgen calibrate --nodes` on three emulated hosts: each pair's measured link beside the rate it is shaped to.

Hosts `head`, `a`, `b` are network namespaces of planning/emulation/harness.py (htb, bandwidth only) sharing this
machine's cores; `a` and `b` run `hexgen node`, the head runs `hexgen calibrate --nodes head,a,b` in its namespace.
Links are shaped to head <-> a 1000, head <-> b 200, a <-> b 50 Mbit/s (override with --mbit). Per pair: the shaped
rate, the measured bandwidth and its ratio to the shaped rate, the measured latency (the emulated links add none:
veth + bridge + gloo, ~0.1-0.5 ms); then the calibration's wall time by phase, as the command logs it.

    .venv/bin/python -m benchmarks.bench_calibrate_hosts [--full] [--one-at-a-time] [--mbit 1000,200,50]

Needs root (network namespaces, tc). --full uses the full measurement budget (minutes), default --quick.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-calibrate-cluster-token-0123456789"
PORT = 8478
PAIRS = (("head", "a"), ("head", "b"), ("a", "b"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the full budget (default: --quick)")
    parser.add_argument("--one-at-a-time", action="store_true", help="profile one node after the other")
    parser.add_argument("--mbit", default="1000,200,50", help="head<->a, head<->b, a<->b in Mbit/s")
    args = parser.parse_args()
    rates = [float(x) for x in args.mbit.split(",")]
    if len(rates) != 3:
        raise SystemExit("--mbit: three rates, head<->a,head<->b,a<->b")
    sys.path.insert(0, str(REPO))
    from planning.inputs.cluster import load_cluster
    from planning.emulation.harness import EmulatedCluster, skip_reason

    reason = skip_reason()
    if reason:
        raise SystemExit(f"cannot emulate hosts here: {reason}")
    shaped = dict(zip(PAIRS, rates))
    env = {**os.environ, "HEXGEN_CLUSTER_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    with EmulatedCluster(["head", "a", "b"], bandwidth_mbit=shaped) as cluster, tempfile.TemporaryDirectory() as tmp:
        head = cluster.address("head")
        for name in ("a", "b"):
            cluster.popen(name, [sys.executable, "-m", "server.entrypoint", "node", "--head", f"{head}:{PORT}",
                                 "--name", name], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        output = Path(tmp) / "calibrated.yaml"
        argv = [sys.executable, "-m", "server.entrypoint", "calibrate", "--nodes", "head,a,b", "--cluster-host", head,
                "--cluster-port", str(PORT), "--join-timeout", "120", "-o", str(output)]
        argv += [] if args.full else ["--quick"]
        argv += ["--one-at-a-time"] if args.one_at_a_time else []
        started = time.monotonic()
        run = cluster.run("head", argv, env=env, cwd=REPO, timeout=3600)
        wall_s = time.monotonic() - started
        if run.returncode != 0:
            print(run.stdout + run.stderr, file=sys.stderr)
            return 1
        calibrated = load_cluster(output)
        print(f"hexgen calibrate --nodes head,a,b {'' if args.full else '--quick '}"
              f"{'--one-at-a-time ' if args.one_at_a_time else ''}on 3 emulated hosts, load average "
              f"{os.getloadavg()[0]:.1f}")
        print(f"{'pair':<12} {'shaped Mbit/s':>14} {'measured Mbit/s':>16} {'ratio':>6} {'latency ms':>11}")
        for (x, y), mbit in shaped.items():
            link = calibrated.link(calibrated.node_index(x), calibrated.node_index(y))
            measured = link.bandwidth_gbps * 1e3
            print(f"{x + ' <-> ' + y:<12} {mbit:>14.0f} {measured:>16.1f} {measured / mbit:>6.2f} {link.latency_ms:>11.3f}")
        phases = re.findall(r"(device profiles|links) measured in ([\d.]+) s", run.stderr)
        print(f"wall {wall_s:.1f} s (agents joining included); " + ", ".join(f"{what} {s} s" for what, s in phases))
        for node in calibrated.nodes:
            d = node.device
            print(f"{node.name}: {d.tflops * 1e3:.1f} GFLOPS (engine fit), {d.mem_bandwidth_gbs:.1f} GB/s, "
                  f"{d.overhead_ms_per_step:.2f} ms/step + {d.overhead_ms_per_layer:.3f} ms/layer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
