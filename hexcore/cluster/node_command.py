"""`hexgen node`: run this host's node agent (hexcore/cluster/agent.py)."""

from __future__ import annotations

import argparse
import logging
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "node", help="join this host to a head as a node agent",
        description="Join this host to a hexgen head (like `ray start --address`): the head starts the workers of "
                    "this host's devices through it. The token comes from --token-file or $HEXGEN_CLUSTER_TOKEN.")
    parser.add_argument("--head", required=True, metavar="HOST:PORT", help="the head's cluster port")
    parser.add_argument("--name", required=True, metavar="NODE", help="this node's name, as deployment files write it")
    parser.add_argument("--token-file", help="file holding the cluster token")
    parser.add_argument("--num-cpus", type=int, help="cores this host gives hexgen's workers (default: all)")
    parser.add_argument("--memory-gb", type=float,
                        help="memory this host gives hexgen's workers, weights and KV cache (default: all its RAM)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hexcore.cluster.agent import run_agent
    from hexcore.cluster.channel import load_token

    host, _, port = args.head.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--head {args.head!r}: expected HOST:PORT")
    from hexcore.hardware import HostBudget

    token = load_token(args.token_file)
    budget = HostBudget.of_this_host(args.num_cpus, args.memory_gb)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        return run_agent(host.strip("[]"), int(port), args.name, token, budget)
    except KeyboardInterrupt:
        return 0
