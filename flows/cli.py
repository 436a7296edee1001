"""The `scf` command. Each library registers its own subcommands; this module only composes them.

Living in flows/ (the top of the dependency graph) lets it reach every layer without
scf/ or evals/ importing each other or the orchestration stack.

Start-up stays fast: the modules imported here only define the subcommands' arguments; each
handler imports what it runs (torch for `scf merge`, Prefect, MLflow and DuckDB for the pipeline
commands) when it is called. `benchmarks/cli_startup.py` measures it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

# Exit status when the reader of our output goes away (`scf methods | head`): 128 + SIGPIPE, what
# a command killed by SIGPIPE reports, so `set -o pipefail` scripts can tell it from success.
EXIT_BROKEN_PIPE = 141


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

    try:
        args = build_parser().parse_args(argv)
        _exit_with_parent()
        faults.inject(args.command)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return code
    except (ScfError, EvalError, PipelineError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _exit_with_parent() -> None:
    """A step started by a flow (``tasks.child`` sets ``SCF_PARENT_PID``) dies with it.

    The step runs in a process group of its own (so a timeout can kill it whole), which also means
    it would outlive a flow process killed with SIGKILL, holding a GPU for nobody. A daemon thread
    notices the parent is gone and kills the step's whole group.
    """
    parent = os.environ.get("SCF_PARENT_PID")
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1.0)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="scf-parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
