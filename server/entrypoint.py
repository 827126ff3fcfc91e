"""The `hexgen` command. Each subcommand lives beside the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> its `register(subparsers)` adds one or more subcommands that set `func`
_SUBCOMMAND_MODULES = [
    "server.serve_command",  # hexgen serve
    "hexcore.cluster.node_command",  # hexgen node
    "planning.plan_command",  # hexgen plan, hexgen simulate
    "planning.loadgen.command",  # hexgen bench serve
    "planning.calibrate.command",  # hexgen calibrate
    "planning.fidelity.command",  # hexgen fidelity
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hexgen", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:  # not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as err:  # user and config errors: a message, not a traceback
        print(f"hexgen {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
