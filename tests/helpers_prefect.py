"""A real Prefect server and workers on loopback for the tests that deploy (test_deploy, test_pool).

`prefect_server_process` runs `prefect server start` with sqlite under a private PREFECT_HOME, on a
free port, with the scheduler off; `start_process`/`stop_process` run workers in their own sessions
and stop them with everything they started.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the venv's `prefect` and `python`
PROCESS_START_S = 120  # server or worker, on 2 busy cores
CLI_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PrefectServer:
    """A `prefect server start` subprocess and the environment that points clients at it."""

    api_url: str
    env: dict[str, str]
    home: Path

    def cli(self, *args: str, cwd: Path = REPO, timeout: float = CLI_TIMEOUT_S) -> str:
        """Run `prefect <args>` against this server; fail the test with its output on error."""
        result = subprocess.run(
            [str(VENV_BIN / "prefect"), *args],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout


def start_process(command: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """Start a long-running process in its own session, its output in `log`."""
    with log.open("wb") as sink:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_process(process: subprocess.Popen) -> None:
    """Terminate `process` and every process it started (a worker's flow runs); kill what lingers."""
    try:
        root = psutil.Process(process.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=15)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=5)
    process.wait(timeout=5)


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll `url` until it answers 200; fail with the process's log if it dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"{url} not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


def client_env(home: Path, api_url: str) -> dict[str, str]:
    """This process's environment without any outside Prefect settings, pointed at our server."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="5",
    )
    return env


@contextlib.contextmanager
def prefect_server_process(home: Path) -> Iterator[PrefectServer]:
    """`prefect server start` on 127.0.0.1, a free port, sqlite under ``home`` (a PREFECT_HOME)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = client_env(home, api_url)
    log = home / "server.log"
    # No scheduler: the nightly deployment's schedule is stored (and checked) but never fires,
    # so a test run at 02:00 UTC does not start a sweep.
    command = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-scheduler"]
    server = start_process([str(VENV_BIN / command[0]), *command[1:]], env, log)
    try:
        wait_healthy(f"{api_url}/health", server, log, PROCESS_START_S)
        yield PrefectServer(api_url=api_url, env=env, home=home)
    finally:
        drain_prefect_clients()
        stop_process(server)


def drain_prefect_clients() -> None:
    """Send this process's pending Prefect events and logs, and stop the workers that send them.

    What prefect_test_harness does on exit. Without it, the events worker a test started against
    its server lives on, still bound to that server once it is stopped: the next module's flows
    then queue their events to a dead address, and the next harness's exit waits on that queue for
    ever (seen as a 900 s timeout in test_racing, right after test_pool).
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(RuntimeError):  # never started
        APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)
