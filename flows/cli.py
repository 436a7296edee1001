"""The `scf` command. Each library registers its own subcommands; this module only composes them.

Living in flows/ (the top of the dependency graph) lets it reach every layer without
scf/ or evals/ importing each other or the orchestration stack.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from evals import cli as evals_cli
    from flows import pipeline_cli
    from scf import cli as scf_cli

    parser = argparse.ArgumentParser(
        prog="scf",
        description="Merge language models (SCF-RKL and baselines), evaluate them, and promote the "
        "best through a fail-closed gate.",
        epilog="Bad input prints 'error: ...' and exits with code 2. See README.md.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    scf_cli.register(subparsers)
    evals_cli.register(subparsers)
    pipeline_cli.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from evals.errors import EvalError
    from flows import faults
    from scf.errors import ScfError
    from tasks.errors import PipelineError

    args = build_parser().parse_args(argv)
    try:
        faults.inject(args.command)
        return int(args.func(args) or 0)
    except (ScfError, EvalError, PipelineError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
