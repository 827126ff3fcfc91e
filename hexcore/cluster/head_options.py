"""The head's cluster options, the same for every command that runs a head (`hexgen serve`, `hexgen
calibrate --nodes`): the flags, and the `cluster:` fields (hexcore.config.ClusterSpec) they set."""

from __future__ import annotations

import argparse


def add_head_arguments(group) -> None:
    group.add_argument("--node-name", help="this host's node name (default head): its devices run here")
    group.add_argument("--cluster-host", help="where the cluster port listens (default 127.0.0.1)")
    group.add_argument("--cluster-port", type=int, help="the cluster port (default 8478)")
    group.add_argument("--token-file", help="file holding the cluster token (else $HEXGEN_CLUSTER_TOKEN)")
    group.add_argument("--join-timeout", type=float, help="seconds to wait for the nodes (default 120)")
    group.add_argument("--num-cpus", type=int, help="cores this host gives its workers (default: all)")
    group.add_argument("--memory-gb", type=float,
                       help="memory this host gives its workers, weights and KV cache (default: all its RAM)")


# ClusterSpec field -> its flag
FLAGS = {"node_name": "--node-name", "host": "--cluster-host", "port": "--cluster-port", "token_file": "--token-file",
         "join_timeout_seconds": "--join-timeout", "num_cpus": "--num-cpus", "memory_gb": "--memory-gb"}


def given_cluster_fields(args: argparse.Namespace) -> dict:
    """The ClusterSpec fields the command line sets (flags not given are left out)."""
    values = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in FLAGS.items()}
    return {field: value for field, value in values.items() if value is not None}
