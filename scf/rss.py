"""The process's own peak resident memory. Standard library only: the benchmark's mergekit runner,
which runs in mergekit's virtualenv without this package installed, loads this file by path."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started (its exec), in bytes.

    Linux's ``VmHWM`` from ``/proc/self/status``, not ``getrusage``'s ``ru_maxrss``: the latter
    keeps the high-water mark the parent had at fork across exec, so a child of a process that has
    just read gigabytes would report the parent's peak instead of its own. Elsewhere (no
    ``/proc``) ``ru_maxrss`` is the best there is (bytes on macOS, KiB on other systems).

    Returns:
        The peak in bytes.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
