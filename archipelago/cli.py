"""The `archipelago` command: one entry point with a subcommand per task.

Argument parsing lives here; each subcommand's work lives in the module that owns it. A
user's mistake (a bad file, an unknown operator, an invalid assignment, a testbed that
cannot be built) ends with one `archipelago: error: ...` line and exit status 2, never a
traceback. Of the product, only the `archipelago` entry point imports this module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from archipelago import __version__
from archipelago.errors import UsageError
from deploy.wan.errors import TestbedError
from opdag.errors import OpDagError


def _add_dag_commands(sub: argparse._SubParsersAction) -> None:
    from archipelago import dagtool

    p = sub.add_parser("capture", help="capture a zoo model into an .opdag file")
    p.add_argument("--model", required=True, help="zoo model: gpt, moe-gpt, resnet, mlp")
    p.add_argument(
        "--arg", action="append", metavar="NAME=VALUE", help="a model argument (repeatable)"
    )
    p.add_argument("--batch", type=int, default=16, help="example batch the costs are measured for")
    p.add_argument("--seed", type=int, default=0, help="seed of the parameters' initialisation")
    p.add_argument("--out", required=True, help="where to write the .opdag file")
    p.set_defaults(func=dagtool.cmd_capture)

    p = sub.add_parser("dag", help="summarise an .opdag file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--top", type=int, default=10, help="how many of the heaviest edges to list")
    p.add_argument("--nodes", action="store_true", help="also list every node")
    p.set_defaults(func=dagtool.cmd_dag)

    p = sub.add_parser("partition", help="cut an .opdag file into pipeline stages")
    p.add_argument("file")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--stages", type=int, help="balanced cut into this many stages")
    how.add_argument("--assign", metavar="FILE", help="JSON or YAML mapping of node name to stage")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=dagtool.cmd_partition)


def _add_demo_command(sub: argparse._SubParsersAction) -> None:
    from archipelago import demo

    p = sub.add_parser("demo", help="train the gpt demo job and compare it with plain PyTorch")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--workers", type=int, default=3, help="worker processes to start")
    p.add_argument(
        "--stages",
        type=int,
        default=None,
        help="pipeline stages (default: OP-Fence picks them; 3 with --in-process)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads, --in-process (0: all)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the stages in this process instead of on worker processes",
    )
    p.set_defaults(func=demo.cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="archipelago",
        description="Train one model across islands of machines joined by slow links.",
    )
    parser.add_argument("--version", action="version", version=f"archipelago {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_dag_commands(sub)
    from archipelago.servicecmds import add_service_commands

    add_service_commands(sub)
    _add_demo_command(sub)
    from deploy.wan.cli import add_testbed_commands

    add_testbed_commands(sub)
    from archipelago.clustercmd import add_cluster_commands

    add_cluster_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (OpDagError, UsageError, TestbedError) as e:
        print(f"archipelago: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("archipelago: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
