"""Fault injection for the reliability tests: make one child step fail the way real ones do.

``SCF_FAULT_INJECT`` holds ``<command>:<label>=<action>`` items separated by ``;``. A child started by
`tasks.child.run_child` knows its label from ``SCF_STEP_LABEL``; when the running ``scf`` subcommand
and label match an item, the action happens before the step starts:

- ``raise``: an unexpected exception (a traceback, exit code 1), as a bug in a step would give;
- ``kill``: the process SIGKILLs itself, as the out-of-memory killer would;
- ``hang``: it sleeps forever, as a stuck generation would, until its timeout kills it.

Unset (always, outside tests), this does nothing.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "SCF_FAULT_INJECT"


def inject(command: str) -> None:
    """Carry out the fault ``SCF_FAULT_INJECT`` asks of this subcommand and label, if any.

    Args:
        command: the ``scf`` subcommand about to run (``merge``, ``eval``, ``zoo``).
    """
    label = os.environ.get("SCF_STEP_LABEL")
    for item in filter(None, os.environ.get(ENV, "").split(";")):
        target, _, action = item.rpartition("=")  # labels may hold "=" (base=math)
        if target.strip() != f"{command}:{label}":
            continue
        if action == "raise":
            raise RuntimeError(f"injected fault in {command} of {label}")
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "hang":
            while True:
                time.sleep(3600)
