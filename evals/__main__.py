"""`python -m evals eval ...` and `python -m evals zoo build ...`: the evaluation subcommands alone.

The same subcommands as `scf eval` / `scf zoo build` (`evals.cli`), for a machine where only the
evaluation library's dependencies are installed (the GPU check runs the zoo build this way).
Bad input prints `error: ...` and exits with code 2, as `scf` does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from evals import cli
from evals.errors import EvalError


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and run one evaluation subcommand.

    Args:
        argv: the arguments (default: sys.argv[1:]).

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(prog="python -m evals", description="Evaluation subcommands of scf.")
    cli.register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
