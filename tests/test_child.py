"""Child processes of the flows: output forwarding, failures as one line, timeouts that kill the whole
process group, and the machine's GPU lock (forced on here: no GPU) serialising steps."""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from tasks import child
from tasks.child import ChildStep, describe_exit, run_child
from tasks.errors import StepFailed
from tasks.gpu import gpu_slot, needs_lock


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_a_child_s_lines_reach_the_callback_and_the_log(tmp_path: Path) -> None:
    lines: list[str] = []
    code = "print('one'); print('two', flush=True)"
    step = ChildStep("merge", "ties", _python(code), tmp_path / "m.log", 60)

    assert run_child(step, lines.append) >= 0
    assert lines == ["one", "two"]
    log = (tmp_path / "m.log").read_text()
    assert log.startswith(f"$ {sys.executable} -c") and log.endswith("one\ntwo\n")


def test_progress_redraws_are_thinned_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(child, "PROGRESS_EVERY_S", 3600.0)
    code = "import sys\nfor i in range(50): sys.stderr.write(f'\\rbar {i}')\nsys.stderr.write('\\ndone\\n')"
    lines: list[str] = []
    run_child(ChildStep("merge", "x", _python(code), tmp_path / "m.log", 60), lines.append)
    assert lines == ["bar 0", "bar 49", "done"]  # the first redraw, then the final state of the bar


def test_an_error_line_is_the_reason(tmp_path: Path) -> None:
    code = """
        import sys
        print("loading")
        print("error: tensor 'w': shape mismatch", file=sys.stderr)
        sys.exit(2)
    """
    with pytest.raises(StepFailed) as caught:
        run_child(ChildStep("merge", "ties", _python(code), tmp_path / "m.log", 60))
    assert str(caught.value) == "merge of ties: error: tensor 'w': shape mismatch"
    assert caught.value.tail == ["loading", "error: tensor 'w': shape mismatch"]
    assert caught.value.log_path == tmp_path / "m.log"


def test_a_traceback_ends_with_its_last_line(tmp_path: Path) -> None:
    step = ChildStep("evaluate", "p", _python("raise RuntimeError('boom')"), tmp_path / "e.log", 60)
    expected = r"^evaluate of p: exited with code 1; last line: RuntimeError: boom$"
    with pytest.raises(StepFailed, match=expected):
        run_child(step)


def test_a_child_killed_by_a_signal_says_which(tmp_path: Path) -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    with pytest.raises(StepFailed) as caught:
        run_child(ChildStep("merge", "linear", _python(code), tmp_path / "m.log", 60))
    assert str(caught.value) == "merge of linear: killed by SIGKILL (out of memory, or killed from outside)"
    assert describe_exit(-11, []) == "killed by SIGSEGV"


def test_a_timeout_kills_the_child_and_everything_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = f"""
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(grandchild.pid))
        print("started", flush=True)
        time.sleep(600)
    """
    started = time.monotonic()
    with pytest.raises(StepFailed) as caught:
        run_child(ChildStep("evaluate", "sce", _python(code), tmp_path / "e.log", timeout_s=3))
    assert time.monotonic() - started < 60
    assert str(caught.value).startswith("evaluate of sce: timed out after ")
    assert str(caught.value).endswith(" s (timeout 3 s); killed")
    with contextlib.suppress(psutil.NoSuchProcess):  # killed with its group; wait for it to be reaped
        psutil.Process(int(pid_file.read_text())).wait(timeout=10)
    assert not psutil.pid_exists(int(pid_file.read_text()))


def test_the_lock_is_needed_on_gpu_steps_only() -> None:
    assert needs_lock("cuda", "auto") and needs_lock("cpu", "on")
    assert not needs_lock("cpu", "auto") and not needs_lock("cuda", "off")


def test_two_gpu_steps_at_once_never_overlap(tmp_path: Path) -> None:
    """Two threads of this process and a second process each run a step holding the GPU lock (forced
    on: this machine has no GPU); the steps' [start, end] intervals must not overlap."""
    lock, stamps = tmp_path / "gpu.lock", tmp_path / "stamps"
    stamps.mkdir()
    sleeper = "\n".join(
        [
            "import sys, time",
            "s = time.time()",
            "time.sleep(1)",
            "open(sys.argv[1], 'w').write(f'{s} {time.time()}')",
        ]
    )

    def step(name: str) -> None:
        with gpu_slot("cpu", "on", lock_path=lock):
            command = [*_python(sleeper), str(stamps / name)]
            run_child(ChildStep("evaluate", name, command, tmp_path / f"{name}.log", 60))

    other = tmp_path / "other.py"
    other.write_text(
        "import pathlib, subprocess, sys\n"
        "from tasks.gpu import machine_lock\n"
        f"with machine_lock(pathlib.Path({str(lock)!r})):\n"
        f"    subprocess.run([sys.executable, '-c', {sleeper!r}, {str(stamps / 'process')!r}], check=True)\n"
    )
    process = psutil.Popen([sys.executable, str(other)], env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    threads = [threading.Thread(target=step, args=(f"thread{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert process.wait(timeout=120) == 0
    intervals = sorted(tuple(map(float, path.read_text().split())) for path in stamps.iterdir())
    assert len(intervals) == 3
    for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
        assert end <= start, intervals


def test_a_step_dies_with_the_flow_process_that_started_it(tmp_path: Path) -> None:
    """A flow process killed with SIGKILL must not leave its steps running (they hold GPUs)."""
    flow_process = tmp_path / "flow.py"
    flow_process.write_text(textwrap.dedent(f"""
        from pathlib import Path
        from tasks.child import ChildStep, run_child, scf_command
        command = scf_command("merge", "--base", "b", "--secondary", "s", "--out", "o")
        run_child(ChildStep("merge", "orphan", command, Path({str(tmp_path / 'm.log')!r}), 600))
    """))
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "SCF_FAULT_INJECT": "merge:orphan=hang"}
    parent = psutil.Popen([sys.executable, str(flow_process)], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (children := parent.children()):
        time.sleep(0.1)
    [step] = children
    time.sleep(5)  # the step hangs in its injected fault (its parent watch started first)
    assert step.is_running()
    parent.kill()
    parent.wait(timeout=30)
    step.wait(timeout=30)  # raises TimeoutExpired if the step outlives its flow process
    assert not step.is_running()
