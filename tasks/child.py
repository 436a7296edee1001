"""Heavy work in child processes: every merge, evaluation and zoo build of a flow runs in a fresh
interpreter (the ``scf`` CLI itself) that exits when done, so every byte of (GPU) memory it held goes
back with it, and a crash, a hang or an out-of-memory kill takes down that step only.

The parent (a Prefect task thread) starts the child in its own process group, forwards its output
line by line (progress bars at most every ``PROGRESS_EVERY_S``) to a callback and to a log file,
waits at most ``timeout_s``, and kills the whole group when the time is up or the parent is
interrupted. A child that fails for any reason becomes one `StepFailed` whose message says which
step failed and how: the child's own ``error:`` line, the signal that killed it, or the timeout.

Example:
    >>> step = ChildStep("merge", "ties", scf_command("merge", ...), Path("merge.log"), 3600)
    >>> run_child(step, print)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tasks.errors import StepFailed

TAIL_LINES = 200  # lines of a child's output kept for messages and the MLflow failure artifact
PROGRESS_EVERY_S = 15.0  # a progress bar redraws many times a second: forward one state per interval
KILL_WAIT_S = 30.0


def scf_cache_dir() -> Path:
    """``$SCF_CACHE`` (default ``~/.cache/scf-pipeline``): the toy zoo, locks, logs of shared steps."""
    return Path(os.environ.get("SCF_CACHE", Path.home() / ".cache" / "scf-pipeline"))


def scf_command(*args: str) -> list[str]:
    """The ``scf`` CLI run by this interpreter: ``python -m flows.cli <args>``.

    Args:
        args: the subcommand and its arguments.

    Returns:
        The argv of the child.
    """
    return [sys.executable, "-m", "flows.cli", *args]


@dataclass(frozen=True)
class ChildStep:
    """One step to run in a child process.

    Attributes:
        step: what it is (``merge``, ``evaluate``, ``zoo``), for messages.
        label: which model it is for (a candidate label or parent name), for messages.
        argv: the command.
        log_path: where the child's whole output is written (the directory is created).
        timeout_s: kill the child (and its process group) after this many seconds.
        env: extra environment variables for the child.
    """

    step: str
    label: str
    argv: list[str]
    log_path: Path
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)


class _OutputPump:
    """Reads a child's merged stdout/stderr in a thread: log file, tail, forwarded lines."""

    def __init__(self, stream, log_path: Path, on_line: Callable[[str], None] | None) -> None:
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._stream, self._log_path, self._on_line = stream, log_path, on_line
        self._last_progress = float("-inf")  # not 0: monotonic() counts from boot, maybe minutes ago
        self._thread = threading.Thread(target=self._run, name="scf-child-output", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending = ""
        with self._log_path.open("a", encoding="utf-8", errors="replace") as log:
            for chunk in iter(lambda: self._stream.read1(65536), b""):
                text = chunk.decode("utf-8", errors="replace")
                log.write(text)
                log.flush()
                pending += text
                # "\n" ends a log line; "\r" ends one redraw of a progress bar.
                while (cut := _first_break(pending)) >= 0:
                    line, brk, pending = pending[:cut], pending[cut], pending[cut + 1 :]
                    self._emit(line, progress=brk == "\r")
            if pending:
                self._emit(pending, progress=False)

    def _emit(self, line: str, *, progress: bool) -> None:
        line = line.rstrip()
        if not line:
            return
        if progress:
            now = time.monotonic()
            if now - self._last_progress < PROGRESS_EVERY_S:
                return
            self._last_progress = now
        self.tail.append(line)
        if self._on_line is not None:
            self._on_line(line)

    def join(self) -> None:
        self._thread.join(timeout=KILL_WAIT_S)


def _first_break(text: str) -> int:
    positions = [i for i in (text.find("\n"), text.find("\r")) if i >= 0]
    return min(positions) if positions else -1


def run_child(step: ChildStep, on_line: Callable[[str], None] | None = None) -> float:
    """Run one step in a child process and wait for it.

    Args:
        step: the command, its log file and its timeout.
        on_line: called with each line the child prints (progress redraws thinned out).

    Returns:
        The seconds it ran.

    Raises:
        StepFailed: the child exited non-zero, was killed by a signal, or ran past its timeout;
            the message names the step, the model and what happened.
    """
    step.log_path.parent.mkdir(parents=True, exist_ok=True)
    step.log_path.write_text(f"$ {' '.join(step.argv)}\n")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "SCF_STEP_LABEL": step.label,
        "SCF_PARENT_PID": str(os.getpid()),  # the child dies with this process (flows/cli.py)
        **step.env,
    }
    started = time.monotonic()
    # A process group of its own: the timeout kills the child and anything it started (vLLM's
    # engine core runs in a process of its own and would keep its GPU memory otherwise).
    process = subprocess.Popen(
        step.argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    pump = _OutputPump(process.stdout, step.log_path, on_line)
    timed_out = False
    try:
        process.wait(timeout=step.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:  # also on KeyboardInterrupt or a cancelled flow: never leave a child holding a GPU
        _kill_group(process)
        pump.join()
    seconds = time.monotonic() - started
    if timed_out:
        reason = f"timed out after {seconds:.0f} s (timeout {step.timeout_s:g} s); killed"
        raise StepFailed(step.step, step.label, reason, list(pump.tail), step.log_path)
    if process.returncode != 0:
        reason = describe_exit(process.returncode, list(pump.tail))
        raise StepFailed(step.step, step.label, reason, list(pump.tail), step.log_path)
    return seconds


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (a no-op once every member has exited)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=KILL_WAIT_S)


def describe_exit(returncode: int, tail: list[str]) -> str:
    """How a child ended, in one line: its ``error:`` line, the signal that killed it, or its code.

    Args:
        returncode: ``Popen.returncode`` (negative: killed by that signal).
        tail: the last lines it printed.

    Returns:
        The reason, e.g. ``killed by SIGKILL (out of memory?)`` or ``error: tensor 'x': ...``.
    """
    if returncode < 0:
        name = _signal_name(-returncode)
        hint = " (out of memory, or killed from outside)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    errors = [line for line in tail if line.startswith("error:")]
    if errors:
        return errors[-1]
    last = next((line for line in reversed(tail) if line.strip()), "no output")
    return f"exited with code {returncode}; last line: {last[:300]}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
