"""Shared by the merge reliability tests: inputs, the `scf merge` child process, what "untouched" means."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from helpers_ckpt import run_scf

REPO = Path(__file__).resolve().parents[2]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (links followed), by relative path: equal digests, same bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def leftovers(directory: Path) -> list[str]:
    """Temporary directories and lock files of writers (``.<name>.scf-...``) in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if ".scf-" in p.name) if directory.is_dir() else []


def refused(args: list[str], *fragments: str) -> str:
    """Run ``scf merge ARGS --quiet`` in-process; assert exit 2, one ``error:`` line holding every fragment.

    Returns:
        The error line.
    """
    code, _, err = run_scf(["merge", *args, "--quiet"])
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def start_paused_merge(
    args: list[str], point: str, marker: Path, *, env: dict | None = None, timeout_s: float = 120
) -> subprocess.Popen:
    """Start ``scf merge ARGS`` (the real entry point, a child process) and wait until it pauses at
    ``point`` (see scf/faults.py); returns the paused process."""
    child_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SCF_FAULT_PAUSE": point,
        "SCF_FAULT_MARKER": str(marker),
        **(env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "merge", *args, "--quiet"],
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"merge ended before reaching {point}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"merge did not reach {point}"
        time.sleep(0.01)
    return proc


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a child and reap it."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[bool]:
    """Mount a tmpfs with ``options`` (e.g. ``size=1m,nr_inodes=4``, ``ro``) at ``path`` for the block.

    Yields:
        True when mounted; False when this machine refuses (no privileges, as on most CI runners)
        or ``SCF_TEST_NO_MOUNT`` is set (to run that path on a machine that could mount): the caller
        then simulates the fault at the writer's seam instead.
    """
    path.mkdir(parents=True, exist_ok=True)
    mounted = (
        not os.environ.get("SCF_TEST_NO_MOUNT")
        and shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
